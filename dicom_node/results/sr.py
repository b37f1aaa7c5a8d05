"""Comprehensive 3D SR (PS3.3 A.35.13) with a TID 1500 Measurement Report (PS3.16 TID 1500).

Content tree::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context: Device observer = the algorithm (TID 1001/1004, Device UID = IHE AIR Device UID)
      Procedure Reported (LOINC)
      Image Library (TID 1600): the images the regions peak on and the key image
      Imaging Measurements
        Measurement Group (TID 1501): the series verdict, Tracking Identifier "Series verdict: Normal|Abnormal";
          Finding Normal | Anomaly; Algorithm Identification (TID 4019: name, version, thresholds); Anomaly score
          (NUM, UCUM "1", INFERRED FROM a point at the top left of the detector's field on the key image); Anomaly
          assessment = Normal | Abnormal at the calibrated image threshold; Comment "Abnormal: anomaly score 7.3 at
          or above the threshold 7.04" (what OHIF writes on the image)
        per region (Abnormal only; Tracking Identifier "Anomaly <n>", Tracking UID = the SEG segment's):
          Measurement Group (TID 1410): Image Region = the region's outline on the image where it peaks; Finding
            Anomaly; Anomaly score (NUM, maximum over the region); Anomaly assessment = Abnormal
          Measurement Group (TID 1411, volume with a SEG): Referenced Segment → the SEG segment; Volume (mm3)

Every group has a SCOORD with its image reference, at the top (TID 1410) or under its NUM (TID 1501): OHIF (3.13,
cornerstone-dicom-sr) shows only measurement groups that have one (merging groups that share a Tracking UID) and its
SR viewport failed on a group without one.

Completion Flag COMPLETE, Verification Flag UNVERIFIED (nobody has signed it). A re-run over a changed instance set
names the earlier SR in the Predecessor Documents Sequence (PS3.3 C.17.2.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.models.base import ModelIdentity
from dicom_node.results.common import (
    ABNORMAL,
    ANOMALY_ASSESSMENT,
    ANOMALY_SCORE,
    CUBIC_MM,
    FINDING_CATEGORY,
    FINDING_TYPE,
    MANUFACTURER,
    NORMAL,
    RESULT_SERIES,
    UNITLESS,
    VOLUME,
    Finding,
    Findings,
    SourceSeries,
    anatomy_code,
    derived_uid,
    device_uid,
    finish,
    model_name,
    procedure_code,
    result_uids,
)

Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _algorithm(model: ModelIdentity, image_threshold: float, pixel_threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model_name(model),
        version=model.version[:64],
        parameters=[f"image_threshold={image_threshold:.6g}", f"pixel_threshold={pixel_threshold:.6g}"],
    )


def _assessment(abnormal: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(ANOMALY_ASSESSMENT, ABNORMAL if abnormal else NORMAL)


def _finding_sites(model: ModelIdentity) -> list[hd.sr.FindingSite] | None:
    anatomy = anatomy_code(model.detector)
    return [hd.sr.FindingSite(anatomic_location=anatomy)] if anatomy is not None else None


def _closed_box(row_min: int, col_min: int, row_max: int, col_max: int) -> np.ndarray:
    """Closed polygon (2-D SCOORD POLYLINE, first point = last) around whole pixels, in image coordinates (column,
    row) where (0, 0) is the top left corner of the top left pixel (PS3.3 C.18.6.1.1)."""
    left, top, right, bottom = float(col_min), float(row_min), float(col_max + 1), float(row_max + 1)
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=np.float32)


def _region(points: np.ndarray, image: Dataset) -> hd.sr.ImageRegion:
    """A 2-D SCOORD with its image reference (SELECTED FROM IMAGE): what OHIF needs to show a measurement group."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(points, dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )


def _region_groups(
    finding: Finding,
    source: SourceSeries,
    seg: Dataset | None,
    model: ModelIdentity,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[Group]:
    """The groups of one region, all with the region's Tracking Identifier and UID (the SEG segment's):

    * TID 1410: the region's outline on the image where it peaks (SCOORD + image reference), its anomaly score
      (maximum over the region) and assessment Abnormal: what OHIF draws and lists;
    * TID 1411 (volume with a SEG): Referenced Segment → the SEG segment, and the region's volume (mm³): what
      highdicom, dcmqi and Slicer follow to the segment. OHIF merges groups that share a Tracking UID."""
    tracking = hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.label)
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": FINDING_TYPE,
        "finding_category": FINDING_CATEGORY,
        "algorithm_id": algorithm,
        "finding_sites": _finding_sites(model),
    }
    score = hd.sr.Measurement(name=ANOMALY_SCORE, value=finding.max_score, unit=UNITLESS, derivation=codes.SCT.Maximum)
    groups: list[Group] = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=_region(finding.outline, source.datasets[finding.peak_frame]),
            measurements=[score],
            qualitative_evaluations=[_assessment(True)],
            **common,
        )
    ]
    if source.is_volume and seg is not None:
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=finding.number,
            source_series=hd.sr.SourceSeriesForSegmentation(source.series_instance_uid),
        )
        volume = hd.sr.Measurement(name=VOLUME, value=round(finding.extent, 1), unit=CUBIC_MM)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=referenced, measurements=[volume], **common
            )
        )
    return groups


def _series_group(
    source: SourceSeries,
    findings: Findings,
    model: ModelIdentity,
    algorithm: hd.sr.AlgorithmIdentification,
    *,
    series_score: float,
    image_threshold: float,
    abnormal: bool,
    tracking_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The verdict of the whole series (TID 1501): the anomaly score, inferred from the key image (where the strongest
    region peaks, else the highest-scoring image; a point at the top left of the field the detector read),
    Normal/Abnormal at the calibrated threshold, and a Comment (DCM 121106) that says so in words.

    The form is what OHIF 3.13 shows: for a group without a top-level SCOORD it draws the SCOORD its NUM is
    INFERRED FROM (it needs that SCOORD's image reference) and writes the Comment and the score beside it, so the
    verdict is on screen; it ignores Tracking Identifiers and qualitative evaluations. Not a finding region: its
    Tracking Identifier is "Series verdict"."""
    frame = key_frame(source, findings)
    field = source.maps[frame] > 0
    top, left = 0, 0
    if field.any():
        top, left = int(np.nonzero(field.any(axis=1))[0][0]), int(np.nonzero(field.any(axis=0))[0][0])
    # A point at the top left of the field: OHIF writes the Comment to the right of the graphic, so a box around
    # the whole field put the verdict outside the viewport; the point keeps it on the image.
    anchor = np.array([[left + 0.5, top + 0.5]], dtype=np.float32)
    verdict = "Abnormal" if abnormal else "Normal"
    score = hd.sr.Measurement(name=ANOMALY_SCORE, value=float(series_score), unit=UNITLESS)
    inferred_from = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=anchor,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source.datasets[frame]),
    )
    inferred_from.RelationshipType = "INFERRED FROM"  # TID 300 row 8 via TID 320: the image area it comes from
    num = score[0]
    if "ContentSequence" in num:
        num.ContentSequence.append(inferred_from)
    else:
        num.ContentSequence = [inferred_from]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Series verdict: {verdict}"),
        finding_type=FINDING_TYPE if abnormal else NORMAL,
        algorithm_id=algorithm,
        finding_sites=_finding_sites(model),
        measurements=[score],
        qualitative_evaluations=[_assessment(abnormal)],
    )
    relation = "at or above" if abnormal else "below"
    comment = f"{verdict}: anomaly score {series_score:.3g} {relation} the threshold {image_threshold:.3g}"
    group[0].ContentSequence.append(  # TID 1501 carries it as a free-text qualitative evaluation
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=comment[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )
    return group


def key_frame(source: SourceSeries, findings: Findings) -> int:
    """The image a result shows first: where the strongest region peaks, else the highest-scoring image."""
    if findings.findings:
        return findings.findings[0].peak_frame
    return int(np.argmax(source.image_scores)) if source.image_scores.size else 0


def _library_images(source: SourceSeries, findings: Findings) -> list[Dataset]:
    """Image Library (TID 1600) entries: the images the findings peak on and the highest-scoring image.

    Listing every slice of a 176-slice series costs seconds in highdicom and tells a reader nothing; the evidence
    sequence still names every source instance analysed."""
    frames = {finding.peak_frame for finding in findings.findings}
    frames.add(key_frame(source, findings))
    images = [source.datasets[frame] for frame in sorted(frames)]
    # TID 1603 descriptors of a radiograph need Patient Orientation and Imager Pixel Spacing; an image without
    # them is left out of the (optional) library rather than described with invented values.
    return [ds for ds in images if ds.get("Modality") not in _PROJECTION or _has_projection_descriptors(ds)]


_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}


def _has_projection_descriptors(ds: Dataset) -> bool:
    return len(ds.get("PatientOrientation") or []) == 2 and len(ds.get("ImagerPixelSpacing") or []) == 2


def build_sr(
    source: SourceSeries,
    findings: Findings,
    model: ModelIdentity,
    *,
    series_score: float,
    image_threshold: float,
    pixel_threshold: float,
    seg: Dataset | None = None,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """The TID 1500 report of one series. ``seg`` (when built) is referenced by the brain findings and listed in the
    evidence; ``predecessors`` are earlier SRs of the same series this one replaces."""
    uids = result_uids(source.series_instance_uid, source.sop_instance_uids, model, "SR")
    algorithm = _algorithm(model, image_threshold, pixel_threshold)
    abnormal = series_score >= image_threshold
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=model_name(model),
            manufacturer_name=MANUFACTURER,
            model_name=model_name(model),
        ),
    )
    groups: list[Group] = [
        _series_group(
            source,
            findings,
            model,
            algorithm,
            series_score=series_score,
            image_threshold=image_threshold,
            abnormal=abnormal,
            tracking_uid=derived_uid("study-finding", uids.sop_instance_uid),
        )
    ]
    for finding in findings.findings:
        groups += _region_groups(finding, source, seg, model, algorithm)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_code(model.detector),
        imaging_measurements=groups,
        referenced_images=_library_images(source, findings),
    )
    evidence: list[Dataset] = [*source.datasets, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=RESULT_SERIES["SR"].number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(predecessors) or None,
    )
    return finish(sr, "SR", model)
