"""The lesion segmenter alone (method ``segmenter``; models.lesion_segmenter): no backbone; a U-Net trained from
scratch to find synthetic lesions painted into the normals. Score = mean of the top lesion probabilities in the head
(component ``segmenter``); map = the probability at the model size. Trains in minutes on a GPU; settings in
``config.extra["segmenter"]``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.lesion_segmenter import (
    STATE_PREFIX,
    LesionUNet,
    SegmenterSettings,
    fit_segmenter,
    full_size,
    image_scores,
    lesion_probability,
    load_segmenter,
    segmenter_state,
    to_model_size,
)
from dicom_node.models.methods.base import MethodScores, Progress, ScoringMethod, with_prefix
from dicom_node.models.methods.features import PatchFeatures

logger = logging.getLogger(__name__)

Reduced = tuple[np.ndarray, np.ndarray]  # (image, head mask) at the segmenter's size


def keep_reduced(items: Iterable[Prepared], store: list[Reduced]) -> Iterator[Prepared]:
    """Pass the prepared images on, keeping each at the lesion segmenter's size (4x less memory) in ``store``."""
    for item in items:
        image = to_model_size(item.image[None])[0, 0].numpy()
        head = to_model_size(item.mask[None])[0, 0].numpy() > 0.5
        store.append((image, head))
        yield item


class SegmenterMethod(ScoringMethod):
    name = "segmenter"
    prefixes = (STATE_PREFIX,)

    def __init__(self, config: DetectorConfig, features: PatchFeatures) -> None:
        super().__init__(config, features)
        self.model: LesionUNet | None = None
        self.settings()  # a bad setting fails here, not after an hour of fitting

    def settings(self) -> SegmenterSettings:
        """Lesion-segmenter settings (models.lesion_segmenter) from ``config.extra["segmenter"]``."""
        return SegmenterSettings.from_dict({"seed": self.config.seed, **self.config.extra.get("segmenter", {})})

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        reduced: list[Reduced] = []
        for count, _ in enumerate(keep_reduced(prepared, reduced), 1):
            if progress:
                progress(count)
        return self.fit_reduced(reduced)

    def fit_reduced(self, reduced: Sequence[Reduced]) -> dict[str, Any]:
        """Train the U-Net on the training images at its size (:func:`keep_reduced`)."""
        if not reduced:
            raise DetectorError("no training images")
        settings = self.settings()
        self.model, record = fit_segmenter(
            np.stack([image for image, _ in reduced]),
            np.stack([head for _, head in reduced]),
            settings,
            self.device,
            lambda step, loss: logger.info("segmenter step %d loss %.4f", step, loss),
        )
        return {"segmenter": settings.to_dict(), "segmenter_training": {**record, "device": self.device.type}}

    def probability(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """The lesion probability (n, SEGMENTER_SIZE, SEGMENTER_SIZE) of prepared images."""
        if self.model is None:
            raise DetectorError(f"{self.config.method}: the model has no lesion segmenter (fit one first)")
        images = np.stack([p.image for p in prepared])
        flip = self.settings().flip_average
        return lesion_probability(self.model, images, self.device, self.config.batch_size, flip_average=flip)

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        """Score = mean of the top lesion probabilities in the head; map = the probability, at the model size."""
        probability = self.probability(prepared)
        masks = np.stack([p.mask for p in prepared])
        scores = image_scores(probability, masks, self.settings())
        maps = full_size(probability, self.config.image_size) * masks
        return MethodScores({"segmenter": scores}, maps.astype(np.float32))

    def state(self) -> dict[str, torch.Tensor]:
        return segmenter_state(self.model) if self.model is not None else {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if any(k.startswith(STATE_PREFIX) for k in tensors):
            self.model = load_segmenter(with_prefix(tensors, STATE_PREFIX), self.settings(), self.device)
