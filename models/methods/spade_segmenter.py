"""SPADE and the lesion segmenter together (method ``spade+segmenter``, the shipped brain_mri 2.2.x).

With z the SPADE map in standard deviations of the calibration normals' head pixels (``config.score_stats
["spade_map"]``, found by :meth:`SpadeSegmenterMethod.calibrate`) and p the lesion probability:

- score = mean of the top ``topk_fraction`` of z + ``score_weight`` x p in the head: either kind of evidence raises
  the slice (detection wants the union); component ``fused``;
- map = sqrt(p x max(z, 0)): a pixel is marked where the tissue is unlike the normals *and* looks like a lesion (the
  outline wants the agreement; on val this gave the best pixel AP and Dice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.lesion_segmenter import full_size
from dicom_node.models.methods.base import Calibration, MethodScores, Progress, ScoringMethod
from dicom_node.models.methods.features import PatchFeatures
from dicom_node.models.methods.segmenter import Reduced, SegmenterMethod, keep_reduced
from dicom_node.models.methods.spade import SpadeMethod
from dicom_node.models.metrics import top_mean

MAP_SCALE = "spade_map"  # config.score_stats key of the SPADE map's [mean, std] on the normals' head pixels


class SpadeSegmenterMethod(ScoringMethod):
    name = "spade+segmenter"
    prefixes = (*SpadeMethod.prefixes, *SegmenterMethod.prefixes)

    def __init__(self, config: DetectorConfig, features: PatchFeatures) -> None:
        super().__init__(config, features)
        self.spade = SpadeMethod(config, features)
        self.segmenter = SegmenterMethod(config, features)

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        """The SPADE bank on the images, then the segmenter on the same images at its size."""
        reduced: list[Reduced] = []
        extra = self.spade.fit(keep_reduced(prepared, reduced), progress, info)
        return {**extra, **self.segmenter.fit_reduced(reduced)}

    def _parts(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(SPADE maps, lesion probability at the model size in the head, head masks)."""
        spade_maps = self.spade.score(prepared).maps
        masks = np.stack([p.mask for p in prepared])
        probability = full_size(self.segmenter.probability(prepared), self.config.image_size) * masks
        return spade_maps, probability, masks

    def _fuse(
        self, spade_maps: np.ndarray, probability: np.ndarray, masks: np.ndarray, scale: Sequence[float]
    ) -> MethodScores:
        mean, std = scale
        z = (spade_maps - mean) / std
        evidence = (z + self.segmenter.settings().score_weight * probability) * masks
        scores = np.array([top_mean(e[m], self.config.topk_fraction) for e, m in zip(evidence, masks, strict=True)])
        maps = np.sqrt(probability * np.clip(z, 0, None)) * masks
        return MethodScores({"fused": scores}, maps.astype(np.float32))

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        if MAP_SCALE not in self.config.score_stats:
            raise DetectorError("spade+segmenter needs calibrating before it can score (dicom-node calibrate)")
        return self._fuse(*self._parts(prepared), self.config.score_stats[MAP_SCALE])

    def calibrate(self, prepared: Sequence[Prepared], specificity: float) -> Calibration:
        """The SPADE map's scale on the normals' head pixels first, then the normals scored with it."""
        spade_maps, probability, masks = self._parts(prepared)
        head = spade_maps[masks] if masks.any() else spade_maps.ravel()
        scale = [float(head.mean()), float(head.std() + 1e-12)]
        scored = self._fuse(spade_maps, probability, masks, scale)
        return self.calibration(prepared, scored, {MAP_SCALE: scale}, specificity)

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.spade.state(), **self.segmenter.state()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.spade.load_state(tensors)
        self.segmenter.load_state(tensors)
