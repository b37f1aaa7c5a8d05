"""Parametric Map IOD (PS3.3 A.75): the continuous anomaly score as 32-bit float pixels.

The Real World Value Mapping (PS3.3 C.7.6.16.2.11) says what the numbers are: "Anomaly score", unit UCUM "1",
identity mapping (slope 1, intercept 0) over the map's value range. The window is centred on the calibrated pixel
threshold so the default display shows "above threshold" bright. Same Frame of Reference and per-frame source
references as the SEG. Only for sources with a Frame of Reference (the IOD requires one): not for radiographs.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.results.common import (
    ANOMALY_SCORE,
    RESULT_SERIES,
    UNITLESS,
    SourceSeries,
    enhanced_equipment,
    finish,
    result_uids,
)
from models.base import ModelIdentity


def build_pm(source: SourceSeries, model: ModelIdentity, pixel_threshold: float) -> Dataset | None:
    """The anomaly-score map of ``source`` in source geometry, or None when the source has no Frame of Reference
    (a radiograph): the Parametric Map IOD requires the Frame of Reference Module and plane position/orientation,
    which a projection image cannot give. The SEG and the Secondary Capture carry a radiograph's map instead."""
    if "FrameOfReferenceUID" not in source.datasets[0]:
        return None
    uids = result_uids(source.series_instance_uid, source.sop_instance_uids, model, "PM")
    maps = np.ascontiguousarray(source.maps, dtype=np.float32)
    low, high = float(maps.min()), float(maps.max())
    if high <= low:
        high = low + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="Anomaly score (higher = less like the normal training images)",
        unit=UNITLESS,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
        quantity_definition=ANOMALY_SCORE,
    )
    width = max(2.0 * abs(high - pixel_threshold), 1e-6)
    pm = hd.pm.ParametricMap(
        source_images=source.datasets,
        pixel_array=maps if source.is_volume else maps[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=RESULT_SERIES["PM"].number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        **enhanced_equipment(model),
        # A score map of a head volume can outline the face; say so rather than promise it cannot.
        contains_recognizable_visual_features=source.is_volume,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            # LINEAR_EXACT: float maps need window widths below 1, which plain LINEAR forbids (PS3.3 C.11.2.1.3).
            hd.VOILUTTransformation(
                window_center=float(pixel_threshold), window_width=width, voi_lut_function="LINEAR_EXACT"
            )
        ],
        content_label="ANOMALY",
        content_description="Anomaly score map",
    )
    return finish(pm, "PM", model)
