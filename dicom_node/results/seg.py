"""Segmentation IOD (PS3.3 A.51): BINARY anomaly regions of an Abnormal result.

Only an Abnormal result has regions (models.regions.select_regions: inside the detector's field, a minimum size
in mm, strongest evidence first, at most three by default); a Normal result gets no SEG. One segment per region
(PS3.3 C.8.20.4 Segment Description Macro): Segment Algorithm Type AUTOMATIC, algorithm identification (family
DCM 123110 Artificial Intelligence), Segmented Property Category (SCT) and Type (99DCMNODE ANOMALY), a Tracking
ID and UID per segment (the SR's region groups carry the same), a Recommended Display CIELab Value per segment.
The SEG shares the source's Frame of Reference and references its source instance
per frame (Derivation Image / Source Image Sequence in the Per-frame Functional Groups, PS3.3 C.7.6.16.2.6).

A brain series gives a multi-frame SEG over the source slices; a radiograph gives one frame. Empty frames are kept
or omitted according to the destination profile (omitting them breaks the alignment in some viewers).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_node.models.base import ModelIdentity
from dicom_node.results.common import (
    CONTENT_CREATOR,
    FINDING_CATEGORY,
    FINDING_TYPE,
    RESULT_SERIES,
    SEGMENT_COLOURS,
    Findings,
    SourceSeries,
    algorithm_identification,
    anatomy_code,
    enhanced_equipment,
    finish,
    projection_geometry,
    result_uids,
)


def seg_variant(keep_empty_frames: bool) -> str:
    return "all-frames" if keep_empty_frames else "non-empty-frames"


def build_seg(
    source: SourceSeries,
    findings: Findings,
    model: ModelIdentity,
    pixel_threshold: float,
    *,
    keep_empty_frames: bool = True,
) -> Dataset | None:
    """The SEG of ``findings`` over ``source``, or None when there is no finding (a SEG needs a segment)."""
    if not findings.findings:
        return None
    uids = result_uids(
        source.series_instance_uid, source.sop_instance_uids, model, "SEG", seg_variant(keep_empty_frames)
    )
    algorithm = algorithm_identification(model, pixel_threshold)
    anatomy = anatomy_code(model.detector)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=finding.number,
            segment_label=finding.label,
            segmented_property_category=FINDING_CATEGORY,
            segmented_property_type=FINDING_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=finding.tracking_uid,
            tracking_id=finding.label,
            anatomic_regions=[anatomy] if anatomy is not None else None,
            display_color=hd.color.CIELabColor(*SEGMENT_COLOURS[(finding.number - 1) % len(SEGMENT_COLOURS)]),
        )
        for finding in findings.findings
    ]
    pixel_array = findings.labels if source.is_volume else findings.labels[0]
    seg = hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid,
        series_number=RESULT_SERIES["SEG"].number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        **enhanced_equipment(model),
        content_label="ANOMALY",
        content_description="Regions that drive the anomaly score",
        content_creator_name=CONTENT_CREATOR,
        omit_empty_frames=not keep_empty_frames,
    )
    projection_geometry(seg, source.datasets[0])
    return finish(seg, "SEG", model)
