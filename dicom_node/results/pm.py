"""Parametric Map IOD (PS3.3 A.75): the continuous anomaly score as 16-bit unsigned integers.

A float map of a 176-slice MR study was larger than the study (46 MB for 35 MB); 16-bit integers halve that and
keep a step of 1/65535 of the map's maximum, far below any threshold. The Real World Value Mapping (PS3.3
C.7.6.16.2.11) turns them back into the score: "Anomaly score", unit UCUM "1", slope = maximum / 65535, intercept
0. Leading and trailing slices whose map is zero everywhere (outside the head) are left out. The window is centred
on the calibrated pixel threshold so the default display shows "above threshold" bright. The encoding is Explicit VR
Little Endian by default; the node builds it as JPEG 2000 Lossless (``transfer_syntax_uid``, about a tenth of the
size), which the C-STORE SCU proposes in a context of its own and decompresses for a PACS that refuses it. Same
Frame of Reference and per-frame source
references as the SEG. Only for sources with a Frame of Reference (the IOD requires one): not for radiographs.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.models.base import ModelIdentity
from dicom_node.results.common import (
    ANOMALY_SCORE,
    CONTENT_CREATOR,
    RESULT_SERIES,
    UNITLESS,
    SourceSeries,
    enhanced_equipment,
    finish,
    result_uids,
)

STORED_MAX = 65535


def build_pm(
    source: SourceSeries,
    model: ModelIdentity,
    pixel_threshold: float,
    *,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Dataset | None:
    """The anomaly-score map of ``source`` in source geometry, or None when the source has no Frame of Reference
    (a radiograph): the Parametric Map IOD requires the Frame of Reference Module and plane position/orientation,
    which a projection image cannot give. The SEG and the Secondary Capture carry a radiograph's map instead."""
    if "FrameOfReferenceUID" not in source.datasets[0]:
        return None
    uids = result_uids(source.series_instance_uid, source.sop_instance_uids, model, "PM")
    maps = np.ascontiguousarray(source.maps, dtype=np.float32)
    nonzero = np.nonzero(maps.reshape(len(maps), -1).max(axis=1) > 0)[0]
    first, last = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, len(maps))
    kept = maps[first:last]
    high = float(max(kept.max(), pixel_threshold, 1e-6))
    scale = STORED_MAX / high
    stored = np.round(np.clip(kept, 0.0, None) * scale).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="Anomaly score (higher = less like the normal training images)",
        unit=UNITLESS,
        value_range=(0, STORED_MAX),
        slope=1.0 / scale,
        intercept=0.0,
        quantity_definition=ANOMALY_SCORE,
    )
    centre = float(pixel_threshold) * scale
    width = max(2.0 * abs(STORED_MAX - centre), 2.0)
    pm = hd.pm.ParametricMap(
        source_images=source.datasets[first:last],
        pixel_array=stored if source.is_volume else stored[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=RESULT_SERIES["PM"].number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        **enhanced_equipment(model),
        # A score map of a head volume can outline the face; say so rather than promise it cannot.
        contains_recognizable_visual_features=source.is_volume,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=centre, window_width=width)],
        content_label="ANOMALY",
        content_description="Anomaly score map",
        content_creator_name=CONTENT_CREATOR,
        transfer_syntax_uid=transfer_syntax_uid,
    )
    return finish(pm, "PM", model)
