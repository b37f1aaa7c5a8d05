"""What every image detector and scoring method shares: the configuration of a fitted model (stored in
model_card.json) and a prepared image (the input of the backbone and of every method)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from dicom_node.models.base import ImageInfo
from dicom_node.models.preprocessing import CropBox


@dataclass
class DetectorConfig:
    """Everything that defines a fitted model besides its tensors (stored in model_card.json)."""

    detector: str
    method: str = "spade"
    version: str = "0.0.0"
    backbone: str = "efficientnet-lite0"
    image_size: int = 256
    strides: tuple[int, ...] = (8, 16)
    pool_size: int = 3
    coreset_size: int = 6_000
    max_candidates: int = 60_000
    knn: int = 1
    topk_fraction: float = 0.01
    rim_patches: int = 0  # maps: zero patches within this many grid steps of the foreground's edge
    score_rim_patches: int | None = None  # image score: rim excluded from the top-k (None: ``rim_patches``)
    score_pool: int = 1  # image score: patch distances averaged over score_pool x score_pool (foreground) first
    smoothing_sigma: float = 4.0
    use_foreground: bool = True
    batch_size: int = 16
    seed: int = 0
    # Calibration (set by calibrate()).
    image_threshold: float = float("inf")
    pixel_threshold: float = float("inf")
    specificity: float = 0.95
    pixel_quantile: float = 0.999
    score_stats: dict[str, list[float]] = field(default_factory=dict)  # component -> [mean, std] on normals
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "strides" in values:
            values["strides"] = tuple(values["strides"])
        return cls(**values)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the backbone: ``image`` (S, S) in [0, 1], ``mask`` (S, S) foreground, ``box`` where it
    came from in the source image."""

    image: np.ndarray
    mask: np.ndarray
    box: CropBox
    info: ImageInfo = ImageInfo()
