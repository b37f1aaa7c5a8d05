"""One decision, one story (issue 19): the series verdict drives the regions of every result object.

Unit tests of the shared region rules (models.regions.select_regions) on small maps, then the objects built from
the real Siemens T1 series and the real CR chest with synthetic maps: Normal → no SEG and no region group; Abnormal
→ at least one region in both the SEG and the SR, inside the detector's field, at least the minimum size, ranked by
evidence and capped; readers (highdicom segread/srread, the SR→SEG link, OHIF's needs) and size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from result_data import CR_CHEST, DCIODVFY, brain_files, dciodvfy_errors, synthetic_result

from dicom_node.models.base import SeriesResult
from dicom_node.models.regions import RegionRules, select_regions
from dicom_node.results.build import BuiltObjects, ObjectRequest, build_results

SPACING = (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------- the region rules
def _field_map(shape: tuple[int, int, int]) -> np.ndarray:
    """Low positive values inside a central field (the detector's mask), zero outside."""
    maps = np.zeros(shape, dtype=np.float32)
    maps[:, 10:-10, 10:-10] = 0.1
    return maps


def test_a_normal_verdict_has_no_region_whatever_the_pixels() -> None:
    maps = _field_map((1, 100, 100))
    maps[0, 40:60, 40:60] = 5.0
    assert select_regions(maps, 1.0, SPACING, abnormal=False) == []
    assert len(select_regions(maps, 1.0, SPACING, abnormal=True)) == 1


def test_regions_are_capped_and_ranked_by_evidence() -> None:
    maps = _field_map((1, 200, 200))
    maps[0, 20:30, 20:30] = 3.0  # small and hot: evidence 100 x 2 = 200
    maps[0, 50:80, 50:80] = 1.5  # large and warm: evidence 900 x 0.5 = 450 → first
    for k in range(4):
        maps[0, 120:128, 20 + 40 * k : 28 + 40 * k] = 1.2 + 0.01 * k  # four weak ones
    every = RegionRules(min_evidence_ratio=0.0)
    regions = select_regions(maps, 1.0, SPACING, abnormal=True, rules=every)
    assert len(regions) == 3  # the default cap
    assert [r.score for r in regions[:2]] == [1.5, 3.0]
    assert regions[0].evidence > regions[1].evidence > regions[2].evidence
    assert all(r.above_threshold for r in regions)
    assert len(select_regions(maps, 1.0, SPACING, abnormal=True, rules=RegionRules(max_regions=1))) == 1
    assert len(select_regions(maps, 1.0, SPACING, abnormal=True, rules=RegionRules(max_regions=10))) == 2
    assert len(select_regions(maps, 1.0, SPACING, abnormal=True, rules=dataclasses.replace(every, max_regions=10))) == 6


def test_faint_regions_beside_the_one_that_drives_the_score_are_left_out() -> None:
    """A region after the first needs a quarter of its evidence (RegionRules.min_evidence_ratio): the four weak
    blobs (evidence about 14 each against 450) would fill the cap with regions a radiologist has to dismiss."""
    maps = _field_map((1, 200, 200))
    maps[0, 50:80, 50:80] = 1.5  # evidence 450
    maps[0, 20:30, 20:30] = 3.0  # evidence 200: 44 %, kept
    for k in range(4):
        maps[0, 120:128, 20 + 40 * k : 28 + 40 * k] = 1.2  # evidence 12.8 each: 3 %, left out
    assert [r.score for r in select_regions(maps, 1.0, SPACING, abnormal=True)] == [1.5, 3.0]
    alone = select_regions(maps, 1.0, SPACING, abnormal=True, rules=RegionRules(min_evidence_ratio=0.5))
    assert [r.score for r in alone] == [1.5]
    with pytest.raises(ValueError):
        RegionRules(min_evidence_ratio=1.5)


def test_minimum_size_is_in_millimetres() -> None:
    maps = _field_map((1, 100, 100))
    maps[0, 30:34, 30:34] = 2.0  # 16 pixels: 4.5 mm across at 1 mm, 2.3 mm at 0.5 mm
    maps[0, 60:75, 60:75] = 1.5  # 225 pixels: 16.9 mm at 1 mm
    at_1mm = select_regions(
        maps, 1.0, (1.0, 1.0, 1.0), abnormal=True, rules=RegionRules(min_size_mm=4.0, min_evidence_ratio=0.0)
    )
    assert [r.score for r in at_1mm] == [1.5, 2.0]
    at_half = select_regions(
        maps, 1.0, (1.0, 0.5, 0.5), abnormal=True, rules=RegionRules(min_size_mm=4.0, min_evidence_ratio=0.0)
    )
    assert [r.score for r in at_half] == [1.5]
    assert at_1mm[0].size_mm == pytest.approx(np.sqrt(4 * 225 / np.pi))
    assert at_1mm[0].extent == pytest.approx(225.0)


def test_regions_stay_inside_the_detectors_field() -> None:
    maps = _field_map((1, 100, 100))
    maps[0, 10:13, 30:50] = 2.0  # on the field's edge (within the 3 mm margin)
    maps[0, 45:55, 45:55] = 1.5
    regions = select_regions(maps, 1.0, SPACING, abnormal=True)
    assert len(regions) == 1 and regions[0].score == 1.5
    field = maps > 0
    assert not (regions[0].mask & ~field).any()


def test_head_regions_end_at_the_cranial_extent() -> None:
    maps = _field_map((3, 200, 100))
    superior = np.broadcast_to(-np.arange(200, dtype=np.float32)[None, :, None], maps.shape)  # rows go foot-ward
    maps[:, 30:40, 40:50] = 1.5  # 20 mm below the field's top (row 10)
    maps[:, 170:180, 40:50] = 3.0  # 160 mm below: the neck
    regions = select_regions(maps, 1.0, SPACING, abnormal=True, superior=superior)
    assert [r.score for r in regions] == [1.5]
    unlimited = RegionRules(cranial_extent_mm=None)
    assert [r.score for r in select_regions(maps, 1.0, SPACING, abnormal=True, rules=unlimited, superior=superior)] == [
        3.0,
        1.5,
    ]


def test_an_abnormal_verdict_without_pixels_above_the_threshold_still_shows_its_evidence() -> None:
    maps = _field_map((1, 100, 100))
    rows, cols = np.mgrid[0:100, 0:100]
    maps[0] += (0.8 * np.exp(-((rows - 30) ** 2 + (cols - 60) ** 2) / 50.0) * (maps[0] > 0)).astype(np.float32)
    regions = select_regions(maps, 1.0, SPACING, abnormal=True)
    assert len(regions) == 1
    region = regions[0]
    assert not region.above_threshold
    assert region.peak == (0, 30, 60) and region.mask[0, 30, 60]
    assert region.size_mm >= RegionRules().min_size_mm


def test_volumes_use_3d_regions() -> None:
    maps = _field_map((20, 60, 60))
    maps[5:15, 25:35, 25:35] = 2.0
    regions = select_regions(maps, 1.0, SPACING, abnormal=True)
    assert len(regions) == 1 and regions[0].extent == pytest.approx(1000.0)
    assert regions[0].mask[5:15].all(axis=(1, 2)).sum() == 0 and regions[0].mask[5:15].any(axis=(1, 2)).all()


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError):
        RegionRules(max_regions=0)
    with pytest.raises(ValueError):
        RegionRules(min_size_mm=-1)


# --------------------------------------------------------------------------------------- objects from real series
ALL = [ObjectRequest("SEG", True), ObjectRequest("SEG", False), ObjectRequest("SR"), ObjectRequest("PM")]


def _build(
    files: list[Path],
    result: SeriesResult,
    requests: list[ObjectRequest] | None = None,
    *,
    rules: RegionRules | None = None,
    predecessors: list[Dataset] | None = None,
) -> BuiltObjects:
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    by_uid = {str(h.SOPInstanceUID): path for h, path in zip(headers, files, strict=True)}
    return build_results(
        headers,
        result,
        requests or ALL,
        read_pixels=lambda ds: pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)]),
        predecessors=predecessors or [],
        rules=rules,
    )


def _items(dataset: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for item in dataset.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _groups(sr: Dataset) -> list[Dataset]:
    return [
        i
        for i in _items(sr)
        if i.get("ValueType") == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]


def _tracking(group: Dataset) -> tuple[str, str]:
    identifier = next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
    uid = next(i.UID for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040")
    return identifier, uid


def _assessments(sr: Dataset) -> list[str]:
    return [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in _items(sr)
        if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Anomaly assessment"
    ]


@pytest.fixture(scope="module")
def brain_abnormal(data_dir: Path) -> BuiltObjects:
    return _build(brain_files(), synthetic_result(brain_files(), "brain_mri"))


@pytest.fixture(scope="module")
def brain_normal_with_hot_pixels(data_dir: Path) -> BuiltObjects:
    """The healthy-T1 case: pixels above the pixel threshold, but the series score is below the image threshold."""
    result = synthetic_result(brain_files(), "brain_mri")
    return _build(brain_files(), dataclasses.replace(result, image_threshold=result.series_score + 1.0))


@pytest.fixture(scope="module")
def chest_below_pixel_threshold(data_dir: Path) -> BuiltObjects:
    """An Abnormal radiograph with no pixel above the pixel threshold (as the real CR chest with the shipped model)."""
    result = synthetic_result([CR_CHEST], "chest_xray")
    return _build([CR_CHEST], dataclasses.replace(result, pixel_threshold=2.0))


def test_normal_series_has_no_seg_and_no_region_group(brain_normal_with_hot_pixels: BuiltObjects) -> None:
    built = brain_normal_with_hot_pixels
    assert built.findings.findings == []
    assert not any(key.startswith("SEG") for key in built.objects)
    sr = built.objects["SR"]
    groups = _groups(sr)
    assert len(groups) == 1 and _tracking(groups[0])[0] == "Series verdict: Normal"
    assert _assessments(sr) == ["Normal"]
    scores = [
        i
        for i in _items(sr)
        if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "ANOMALY-SCORE"
    ]
    assert len(scores) == 1 and float(scores[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.9)
    assert not any(
        i.get("ConceptNameCodeSequence", [Dataset()])[0].get("CodeMeaning") == "Referenced Segment" for i in _items(sr)
    )


def test_abnormal_series_has_its_regions_in_both_seg_and_sr(brain_abnormal: BuiltObjects) -> None:
    built = brain_abnormal
    seg, sr = built.objects["SEG-all-frames"], built.objects["SR"]
    assert 1 <= len(built.findings.findings) <= 3
    segments = {str(s.TrackingUID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    regions = {uid for name, uid in map(_tracking, _groups(sr)) if name.startswith("Anomaly")}
    assert regions == set(segments)
    assert _assessments(sr) == ["Abnormal"] * (1 + len(built.findings.findings))
    for segment in seg.SegmentSequence:
        assert len(segment.RecommendedDisplayCIELabValue) == 3
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Anomaly"
    assert seg.ContentCreatorName == "dicom-node^AI"


def test_regions_are_capped_on_a_real_series(data_dir: Path) -> None:
    files = brain_files()
    result = synthetic_result(files, "brain_mri")
    maps = np.array(result.anomaly_maps)
    for k in range(6):  # six more separate hot blobs
        maps[100 + 10 * (k % 3) : 106 + 10 * (k % 3), 40 + 60 * (k // 3) : 50 + 60 * (k // 3), 150:160] = 0.6 + k / 100
    result = dataclasses.replace(result, anomaly_maps=maps)
    every = RegionRules(min_evidence_ratio=0.0)
    built = _build(files, result, [ObjectRequest("SEG", True), ObjectRequest("SR")], rules=every)
    assert len(built.findings.findings) == 3 and len(built.objects["SEG-all-frames"].SegmentSequence) == 3
    # With the default rules the six faint blobs are left out: the two synthetic regions remain.
    default = _build(files, result, [ObjectRequest("SEG", True)])
    assert len(default.objects["SEG-all-frames"].SegmentSequence) == 2
    one = _build(files, result, [ObjectRequest("SEG", True)], rules=RegionRules(max_regions=1))
    assert len(one.objects["SEG-all-frames"].SegmentSequence) == 1
    # Evidence ranks: the large 0.9 blob first.
    assert built.findings.findings[0].max_score == pytest.approx(0.9)


def test_no_region_in_the_neck_of_a_real_head_series(data_dir: Path) -> None:
    files = brain_files()
    result = synthetic_result(files, "brain_mri")
    maps = np.array(result.anomaly_maps)
    maps[60:80, 200:215, 100:130] = 0.99  # hottest of all, but about 200 mm below the top of the head
    built = _build(files, dataclasses.replace(result, anomaly_maps=maps), [ObjectRequest("SEG", True)])
    assert [round(f.max_score, 2) for f in built.findings.findings] == [0.9, 0.85]


def test_abnormal_radiograph_without_pixels_above_threshold_shows_where_the_score_came_from(
    chest_below_pixel_threshold: BuiltObjects,
) -> None:
    built = chest_below_pixel_threshold
    assert len(built.findings.findings) == 1
    finding = built.findings.findings[0]
    assert not finding.above_threshold and finding.max_score == pytest.approx(0.95)
    assert len(built.objects["SEG-all-frames"].SegmentSequence) == 1
    names = [_tracking(g)[0] for g in _groups(built.objects["SR"])]
    assert names == ["Series verdict: Abnormal", "Anomaly 1"]


def test_rerun_applies_the_same_rules(brain_normal_with_hot_pixels: BuiltObjects) -> None:
    files = brain_files()[:60]
    result = synthetic_result(files, "brain_mri")
    normal = dataclasses.replace(result, image_threshold=result.series_score + 1.0)
    earlier = _build(files, normal, [ObjectRequest("SEG", True), ObjectRequest("SR")])
    again = _build(
        files, normal, [ObjectRequest("SEG", True), ObjectRequest("SR")], predecessors=[earlier.objects["SR"]]
    )
    assert set(again.objects) == {"SR"} and _assessments(again.objects["SR"]) == ["Normal"]
    assert "PredecessorDocumentsSequence" in again.objects["SR"]


def test_highdicom_reads_seg_and_sr_and_follows_the_sr_to_the_seg(brain_abnormal: BuiltObjects, tmp_path: Path) -> None:
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    brain_abnormal.objects["SEG-all-frames"].save_as(seg_path, enforce_file_format=True)
    brain_abnormal.objects["SR"].save_as(sr_path, enforce_file_format=True)
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert seg.number_of_segments == len(brain_abnormal.findings.findings)
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == seg.number_of_segments
    for group in volumetric:
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        number = int(referenced.referenced_segment_numbers[0])
        assert str(seg.get_segment_description(number).tracking_uid) == str(group.tracking_uid)
    planar = sr.content.get_planar_roi_measurement_groups()
    scores = {
        str(g.tracking_uid): g.get_measurements(name=hd.sr.CodedConcept("ANOMALY-SCORE", "99DCMNODE", "Anomaly score"))
        for g in planar
    }
    assert all(len(found) == 1 for found in scores.values())


def _codes(dataset: Dataset) -> list[Dataset]:
    found: list[Dataset] = []
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                if "CodingSchemeDesignator" in item:
                    found.append(item)
                found.extend(_codes(item))
    return found


def test_codes_are_short_identified_and_say_anomaly(
    brain_abnormal: BuiltObjects, chest_below_pixel_threshold: BuiltObjects
) -> None:
    for built in (brain_abnormal, chest_below_pixel_threshold):
        for key, dataset in built.objects.items():
            codes = _codes(dataset)
            assert codes, key
            assert all("LongCodeValue" not in c and "URNCodeValue" not in c for c in codes), key
            assert all(len(str(c.CodeValue)) <= 16 for c in codes if "CodeValue" in c), key
            assert not any(c.get("CodeValue") == "52988006" for c in codes), f"{key}: 'Lesion' is a diagnosis"
            designators = {str(c.CodingSchemeDesignator) for c in codes}
            identified = {str(i.CodingSchemeDesignator) for i in dataset.CodingSchemeIdentificationSequence}
            private = {d for d in designators if d.startswith("99")}
            assert private <= identified, key


def test_every_sr_group_has_an_image_region_ohif_can_place(
    brain_abnormal: BuiltObjects, brain_normal_with_hot_pixels: BuiltObjects, chest_below_pixel_threshold: BuiltObjects
) -> None:
    """OHIF 3.13 (extensions/cornerstone-dicom-sr) merges measurement groups by Tracking Unique Identifier and shows
    a measurement only when the merged group has a SCOORD whose SELECTED FROM child names an image, at the top of the
    group (TID 1410) or under a NUM it is INFERRED FROM (TID 1501): a group without one crashed its SR viewport
    (coords[0].ReferencedSOPSequence of undefined)."""
    for built in (brain_abnormal, brain_normal_with_hot_pixels, chest_below_pixel_threshold):
        sources = set(built.source.sop_instance_uids)
        merged: dict[str, list[Dataset]] = {}
        for group in _groups(built.objects["SR"]):
            merged.setdefault(_tracking(group)[1], []).extend(group.ContentSequence)
        for uid, content in merged.items():
            nums = [i for i in content if i.get("ValueType") == "NUM"]
            scoords = [i for i in content if i.get("ValueType") == "SCOORD"] or [
                child for num in nums for child in num.get("ContentSequence", []) if child.get("ValueType") == "SCOORD"
            ]
            assert scoords, uid
            reference = scoords[0].ContentSequence[0].ReferencedSOPSequence[0]
            assert reference.ReferencedSOPInstanceUID in sources
            assert any(i.get("ValueType") == "NUM" for i in content), uid


@pytest.mark.slow
@pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools (dciodvfy) is not installed")
def test_verdict_driven_objects_pass_dciodvfy(
    brain_normal_with_hot_pixels: BuiltObjects, chest_below_pixel_threshold: BuiltObjects, tmp_path: Path
) -> None:
    for name, built in (("normal", brain_normal_with_hot_pixels), ("chest", chest_below_pixel_threshold)):
        for key, dataset in built.objects.items():
            path = tmp_path / f"{name}-{key}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == [], f"{name} {key}"


def _size(dataset: Dataset, path: Path) -> int:
    dataset.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def test_result_objects_stay_small_against_the_176_slice_source(brain_abnormal: BuiltObjects, tmp_path: Path) -> None:
    source = sum(path.stat().st_size for path in brain_files())
    sizes = {key: _size(ds, tmp_path / f"{key}.dcm") for key, ds in brain_abnormal.objects.items()}
    # What a PACS with the default profile [SEG, SR] (empty frames kept) receives: at most 25 % of the source.
    assert sizes["SEG-all-frames"] + sizes["SR"] <= 0.25 * source
    assert sizes["SEG-non-empty-frames"] + sizes["SR"] <= 0.05 * source
    # The Parametric Map is stored JPEG 2000 Lossless; this test's map is noise in 8-pixel cells everywhere, which
    # compresses poorly (a real map, zero outside the head, is checked with the shipped model below).
    assert sizes["PM"] <= 0.25 * source


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["brain_mri", "chest_xray"])
def test_shipped_models_on_the_real_studies_tell_one_story(detector: str, data_dir: Path, tmp_path: Path) -> None:
    """The README's two studies through the shipped weights: the verdict decides the objects. The healthy Siemens
    T1 is Normal (it got a 20-segment SEG before): an SR alone. Made Abnormal (its threshold lowered below its
    score), every object together stays within a quarter of the 176-slice source."""
    from dicom_node.models.registry import default_registry

    files = brain_files() if detector == "brain_mri" else [CR_CHEST]
    result = default_registry().load(detector, None, "cpu").score_series([pydicom.dcmread(f) for f in files])
    built = _build(files, result, [ObjectRequest("SEG", True), ObjectRequest("SR")])
    sr = built.objects["SR"]
    regions = [name for name, _ in map(_tracking, _groups(sr)) if name.startswith("Anomaly")]
    if detector == "brain_mri":
        assert not result.is_abnormal
    if result.is_abnormal:
        assert 1 <= len(built.findings.findings) <= 3
        assert len(built.objects["SEG-all-frames"].SegmentSequence) == len(built.findings.findings)
        assert len(regions) == len(built.findings.findings)
        assert _assessments(sr)[0] == "Abnormal"
    else:
        assert set(built.objects) == {"SR"} and regions == [] and _assessments(sr) == ["Normal"]
    if detector == "brain_mri":
        forced = dataclasses.replace(result, image_threshold=result.series_score - 1.0)
        everything = _build(files, forced)
        source = sum(path.stat().st_size for path in files)
        sizes = {
            key: _size(ds, tmp_path / f"{key}.dcm")
            for key, ds in everything.objects.items()
            if key != "SEG-non-empty-frames"
        }
        assert {"SEG-all-frames", "SR", "PM"} <= set(sizes)
        assert sum(sizes.values()) <= 0.25 * source, sizes
