"""Result objects built from the real Siemens T1 series and the real CR chest with synthetic anomaly maps.

Every object type is checked with dciodvfy (dicom3tools): zero errors allowed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from result_data import CR_CHEST, DCIODVFY, brain_files, dciodvfy_errors, synthetic_result

from dicom_node.results.build import BuiltObjects, ObjectRequest, build_results
from dicom_node.results.common import RESULT_SERIES, device_uid

ALL = [
    ObjectRequest("SEG", True),
    ObjectRequest("SEG", False),
    ObjectRequest("SR"),
    ObjectRequest("PM"),
    ObjectRequest("SC"),
]


def _build(
    files: list[Path], detector: str, *, abnormal: bool = True, predecessors: list[Dataset] | None = None
) -> BuiltObjects:
    result = synthetic_result(files, detector, abnormal=abnormal)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    by_uid = {str(h.SOPInstanceUID): path for h, path in zip(headers, files, strict=True)}
    return build_results(
        headers,
        result,
        ALL,
        read_pixels=lambda ds: pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)]),
        predecessors=predecessors or [],
    )


@pytest.fixture(scope="module")
def brain(data_dir: Path) -> BuiltObjects:
    return _build(brain_files(), "brain_mri")


@pytest.fixture(scope="module")
def chest(data_dir: Path) -> BuiltObjects:
    return _build([CR_CHEST], "chest_xray")


def _saved(dataset: Dataset, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
@pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools (dciodvfy) is not installed")
@pytest.mark.parametrize("which", ["brain", "chest"])
def test_every_object_type_passes_dciodvfy(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    built: BuiltObjects = request.getfixturevalue(which)
    expected = {"SEG-all-frames", "SEG-non-empty-frames", "SR", "PM", "SC"}
    # The Parametric Map IOD needs a Frame of Reference, which a radiograph has not.
    assert set(built.objects) == (expected if which == "brain" else expected - {"PM"})
    for key, dataset in built.objects.items():
        errors = dciodvfy_errors(_saved(dataset, tmp_path, key))
        assert errors == [], f"{which} {key}: {errors}"


def test_brain_seg_one_segment_per_finding_aligned_with_the_source(brain: BuiltObjects) -> None:
    seg = brain.objects["SEG-all-frames"]
    source = brain.source.datasets
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.SeriesNumber == RESULT_SERIES["SEG"].number
    assert seg.SeriesDescription == RESULT_SERIES["SEG"].description
    assert len(seg.SegmentSequence) == len(brain.findings.findings) == 2
    for segment, finding in zip(seg.SegmentSequence, brain.findings.findings, strict=True):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert (
            segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        )
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert segment.TrackingUID == finding.tracking_uid
    # All frames kept: one frame per source slice and segment; each references its source instance.
    assert int(seg.NumberOfFrames) == len(source) * 2
    referenced = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in source}
    # The large blob spans 15 slices of the series.
    assert len(brain.findings.findings[0].frames) == 15
    lean = brain.objects["SEG-non-empty-frames"]
    assert int(lean.NumberOfFrames) == sum(len(f.frames) for f in brain.findings.findings)
    assert lean.SOPInstanceUID != seg.SOPInstanceUID and lean.SeriesInstanceUID != seg.SeriesInstanceUID


def test_every_object_carries_the_ihe_air_processing_algorithm(brain: BuiltObjects) -> None:
    for key, dataset in brain.objects.items():
        items = [
            item
            for item in dataset.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        assert len(items) == 1, key
        item = items[0]
        assert item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
        assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert item.Manufacturer == "dicom-node"
        assert item.DeviceUID == device_uid(synthetic_result(brain_files()[:1], "brain_mri").model)
        assert dataset.StudyInstanceUID == brain.source.datasets[0].StudyInstanceUID, key


def _content_items(dataset: Dataset) -> list[Dataset]:
    items: list[Dataset] = []
    for item in dataset.get("ContentSequence", []):
        items.append(item)
        items.extend(_content_items(item))
    return items


def test_brain_sr_is_tid1500_with_segment_references(brain: BuiltObjects) -> None:
    sr = brain.objects["SR"]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    items = _content_items(sr)
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in items if "ConceptNameCodeSequence" in item]
    assert "Observer Type" in names and "Procedure reported" in names and "Image Library" in names
    groups = [
        i for i in items if i.get("ValueType") == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]
    # The series verdict (TID 1501, its score inferred from an image region), then per region a planar group
    # (outline on its peak slice) and a volumetric group (Referenced Segment), both with the region's tracking UID.
    assert len(groups) == 1 + 2 * len(brain.findings.findings)
    templates = [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups if "ContentTemplateSequence" in g]
    assert templates.count("1501") == 1 and templates.count("1411") == 2 and templates.count("1410") == 2
    comments = [
        i.TextValue
        for i in items
        if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert len(comments) == 1 and comments[0].startswith("Abnormal: anomaly score 0.9 at or above the threshold 0.5")
    segment_refs = [
        i.ReferencedSOPSequence[0]
        for i in items
        if i.get("ValueType") == "IMAGE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Referenced Segment"
    ]
    seg = brain.objects["SEG-all-frames"]
    assert {ref.ReferencedSOPInstanceUID for ref in segment_refs} == {seg.SOPInstanceUID}
    assert sorted(int(ref.ReferencedSegmentNumber) for ref in segment_refs) == [1, 2]
    score_items = [
        i for i in items if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning == "Anomaly score"
    ]
    assert len(score_items) == 3  # whole series + two findings
    scores = [float(i.MeasuredValueSequence[0].NumericValue) for i in score_items]
    assert max(scores) == pytest.approx(0.9, abs=1e-6)
    units = {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in score_items}
    assert units == {"1"}
    assessments = [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Anomaly assessment"
    ]
    assert assessments == ["Abnormal"] * 3


def test_chest_sr_has_planar_polygon_in_source_pixels(chest: BuiltObjects) -> None:
    sr = chest.objects["SR"]
    items = _content_items(sr)
    polygons = [i for i in items if i.get("ValueType") == "SCOORD"]
    # The series verdict's anchor point (where OHIF writes it), then one outline per region; a radiograph shows its
    # strongest region only (models.regions.rules_for), though the synthetic map has two blobs.
    assert len(polygons) == 1 + len(chest.findings.findings) == 2
    assert polygons[0].GraphicType == "POINT"
    assert all(p.GraphicType == "POLYLINE" for p in polygons[1:])  # 2-D polygon: closed POLYLINE
    first = np.asarray(polygons[1].GraphicData, dtype=float).reshape(-1, 2)
    rows, columns = int(chest.source.datasets[0].Rows), int(chest.source.datasets[0].Columns)
    # The strongest blob: rows R/3..R/2, columns C/5..C/2 (x = column, y = row, pixel edges).
    assert first[:, 0].min() == columns // 5 and first[:, 0].max() == columns // 2
    assert first[:, 1].min() == rows // 3 and first[:, 1].max() == rows // 2
    assert first[0].tolist() == first[-1].tolist()
    for polygon in polygons:
        image_ref = polygon.ContentSequence[0].ReferencedSOPSequence[0]
        assert image_ref.ReferencedSOPInstanceUID == chest.source.datasets[0].SOPInstanceUID
    seg = chest.objects["SEG-all-frames"]
    assert int(seg.NumberOfFrames) == 1  # one frame, one segment


def test_parametric_map_holds_the_scores_as_integers_with_a_real_world_value_mapping(brain: BuiltObjects) -> None:
    pm = brain.objects["PM"]
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert "FloatPixelData" not in pm and int(pm.BitsAllocated) == 16 and int(pm.PixelRepresentation) == 0
    slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
    pixels = pm.pixel_array.reshape(int(pm.NumberOfFrames), 256, 256).astype(np.float64) * slope + intercept
    # Each frame holds the map of the source instance it references (highdicom orders frames by position), to
    # within one integer step.
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(brain.source.datasets)}
    for frame, item in zip(pixels, pm.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(frame, brain.source.maps[index[uid]], atol=slope)


def test_secondary_capture_is_rgb_with_burned_in_warning(chest: BuiltObjects) -> None:
    sc = chest.objects["SC"]
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8 and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    assert max(int(sc.Rows), int(sc.Columns)) <= 1024
    pixels = sc.pixel_array
    # The heat map is red/yellow: somewhere red clearly exceeds blue.
    assert int((pixels[..., 0].astype(int) - pixels[..., 2].astype(int)).max()) > 100


def test_uids_are_deterministic_and_follow_the_instance_set(data_dir: Path) -> None:
    files = [CR_CHEST]
    first = _build(files, "chest_xray")
    again = _build(files, "chest_xray")
    for key in first.objects:
        assert first.objects[key].SOPInstanceUID == again.objects[key].SOPInstanceUID
        assert first.objects[key].SeriesInstanceUID == again.objects[key].SeriesInstanceUID
    late = brain_files()[:40]
    earlier, later = _build(late[:30], "brain_mri"), _build(late, "brain_mri")
    assert earlier.objects["SR"].SeriesInstanceUID == later.objects["SR"].SeriesInstanceUID
    assert earlier.objects["SR"].SOPInstanceUID != later.objects["SR"].SOPInstanceUID


def test_rerun_references_the_earlier_sr_as_predecessor(chest: BuiltObjects) -> None:
    earlier = chest.objects["SR"]
    again = _build([CR_CHEST], "chest_xray", predecessors=[earlier])
    predecessor = again.objects["SR"].PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == earlier.StudyInstanceUID
    reference = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == earlier.SOPInstanceUID


def test_normal_result_has_no_seg_and_a_normal_report(data_dir: Path) -> None:
    built = _build([CR_CHEST], "chest_xray", abnormal=False)
    assert built.findings.findings == []
    assert not any(key.startswith("SEG") for key in built.objects)
    items = _content_items(built.objects["SR"])
    assessments = [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Anomaly assessment"
    ]
    assert assessments == ["Normal"]
