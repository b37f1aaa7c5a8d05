"""The generic 2-D image anomaly detector every shipped detector builds on.

A detector = preparation of each image (subclass hook :meth:`ImageAnomalyDetector.prepare`: crop, foreground mask,
intensity normalisation) + one scoring method (models.methods; fitted on normal images only) chosen by
``config.method`` from the detector class's ``methods`` table. The methods of the installed package:

- ``spade`` (models.methods.spade): each query patch of a frozen ImageNet backbone is compared only with the
  patches of the ``k_images`` most similar training normals (models.neighbour_bank), in a whitened PCA subspace;
  parameters in ``config.extra["spade"]``.
- ``segmenter`` (models.methods.segmenter): no backbone; a U-Net trained from scratch to find synthetic lesions
  painted into the normals (models.lesion_segmenter); map = lesion probability. Trains in minutes on a GPU; settings
  in ``config.extra["segmenter"]``.
- ``spade+segmenter`` (models.methods.spade_segmenter): both, fused (the shipped brain_mri).
- chest_xray adds ``padim`` (models.methods.padim; the shipped chest_xray).

Methods no shipped model uses (PatchCore, MSDE, their sum, the denoising autoencoder) live in the repository's
``experiments/`` folder, outside the installed package.

Calibration (:meth:`ImageAnomalyDetector.calibrate`, a step of its own) asks the method for its statistics and the
image threshold at a chosen specificity on held-out normal images, and sets the pixel threshold at a high quantile of
the normal maps' foreground pixels; both go in the model card (models.card) with the weights' sha256.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pydicom
import torch

from dicom_node.models.backbones import EfficientNetLiteBackbone, select_device
from dicom_node.models.base import Detector, DetectorError, ImageInfo, ImageScores, ModelIdentity, SeriesResult
from dicom_node.models.card import (
    CARD_JSON,
    CARD_MD,
    WEIGHTS_FILE,
    read_model,
    render_model_card,
    sha256_file,
    write_model,
)
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.methods.base import ScoringMethod
from dicom_node.models.methods.features import PatchFeatures
from dicom_node.models.methods.segmenter import SegmenterMethod
from dicom_node.models.methods.spade import SpadeMethod
from dicom_node.models.methods.spade_segmenter import SpadeSegmenterMethod
from dicom_node.models.preprocessing import crop_square, dicom_image, resize, square_crop_box, uncrop_square

__all__ = [
    "CARD_JSON",
    "CARD_MD",
    "IMAGE_METHODS",
    "WEIGHTS_FILE",
    "DetectorConfig",
    "ImageAnomalyDetector",
    "MethodFactory",
    "Prepared",
    "render_model_card",
    "sha256_file",
    "timed",
]

MethodFactory = Callable[[DetectorConfig, PatchFeatures], ScoringMethod]
"""``factory(config, features)`` → an unfitted scoring method (a ScoringMethod subclass is one)."""

IMAGE_METHODS: dict[str, MethodFactory] = {
    SpadeMethod.name: SpadeMethod,
    SegmenterMethod.name: SegmenterMethod,
    SpadeSegmenterMethod.name: SpadeSegmenterMethod,
}


class ImageAnomalyDetector(Detector):
    """Generic detector; subclasses set ``name``, ``card_defaults`` and ``methods`` and override :meth:`prepare`
    and :meth:`score_series`."""

    name = "image"
    card_defaults: dict[str, Any] = {}
    methods: Mapping[str, MethodFactory] = IMAGE_METHODS
    channels_last = False  # run the backbone with channels-last weights (models.methods.features.PatchFeatures)

    def __init__(self, config: DetectorConfig, device: str | torch.device | None = "cpu") -> None:
        factory = self.methods.get(config.method)
        if factory is None:
            raise DetectorError(
                f"unknown method {config.method!r}; known: {', '.join(self.methods)} (methods no shipped model uses "
                "are in the repository's experiments/ folder)"
            )
        self.config = config
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.features = PatchFeatures(config, self.device, channels_last=self.channels_last)
        self.method = factory(config, self.features)  # a bad setting fails here, not after an hour of fitting
        self.weights_sha256 = ""
        self.card: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- contract
    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(
            detector=self.config.detector,
            method=self.config.method,
            version=self.config.version,
            weights_sha256=self.weights_sha256,
        )

    @property
    def image_threshold(self) -> float:
        return float(self.config.image_threshold)

    @property
    def pixel_threshold(self) -> float:
        return float(self.config.pixel_threshold)

    @property
    def backbone(self) -> EfficientNetLiteBackbone:
        return self.features.backbone

    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        """Default for single images (e.g. radiographs): each instance scored alone; series score = maximum."""
        if not datasets:
            raise DetectorError("empty series")
        images = [dicom_image(ds) for ds in datasets]
        result = self.score_images(images)
        return SeriesResult(
            model=self.identity,
            series_score=float(np.max(result.scores)),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            image_scores=result.scores,
            anomaly_maps=result.maps,
            scored=np.ones(len(datasets), dtype=bool),
        )

    # ------------------------------------------------------------------------------------------ preparation
    def prepare(self, image: np.ndarray) -> Prepared:
        """Default: the whole image padded to a square, resized to ``image_size``; everything is foreground."""
        box = square_crop_box(np.zeros(image.shape, dtype=bool))
        size = self.config.image_size
        square = resize(crop_square(image, box), (size, size))
        return Prepared(image=square, mask=np.ones((size, size), dtype=bool), box=box)

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Iterable[np.ndarray],
        progress: Callable[[int], None] | None = None,
        info: Sequence[ImageInfo] | None = None,
    ) -> None:
        """Fit the method on normal images ([0, 1] floats of any size); ``info`` (per image, where known) is for
        methods that use views or patients (the brain methods do not)."""
        torch.manual_seed(self.config.seed)
        self.record(self.method.fit((self.prepare(img) for img in images), progress, info))

    def record(self, extra: Mapping[str, Any]) -> None:
        """Record a method's ``config.extra`` entries (a None value removes the entry)."""
        for key, value in extra.items():
            if value is None:
                self.config.extra.pop(key, None)
            else:
                self.config.extra[key] = value

    # ------------------------------------------------------------------------------------------------ scoring
    def score_prepared(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n,), maps (n, S, S)) in the prepared (square, model-input) geometry."""
        if not prepared:
            size = self.config.image_size
            return np.zeros(0), np.zeros((0, size, size), dtype=np.float32)
        scored = self.method.score(prepared)
        scores = self.method.image_scores(prepared, scored.components, self.config.score_stats)
        return scores, scored.maps.astype(np.float32)

    def prepare_all(self, images: Sequence[np.ndarray], info: Sequence[ImageInfo] | None = None) -> list[Prepared]:
        """:meth:`prepare` each image and attach its ``info`` (where given)."""
        prepared = [self.prepare(np.asarray(img, dtype=np.float32)) for img in images]
        if info is None:
            return prepared
        if len(info) != len(prepared):
            raise DetectorError(f"{len(info)} image descriptions for {len(prepared)} images")
        return [replace(p, info=i) for p, i in zip(prepared, info, strict=True)]

    def score_each(
        self, images: Sequence[np.ndarray], info: Sequence[ImageInfo] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores (n,) and one map per image in that image's own geometry (images may differ in size)."""
        prepared = self.prepare_all(images, info)
        scores, maps = self.score_prepared(prepared)
        return scores, [uncrop_square(m, p.box) for m, p in zip(maps, prepared, strict=True)]

    def score_images(self, images: Sequence[np.ndarray]) -> ImageScores:
        scores, maps = self.score_each(images)
        if len({m.shape for m in maps}) > 1:
            raise DetectorError("score_images needs images of one size; use score_each for mixed sizes")
        size = self.config.image_size
        stacked = np.stack(maps) if maps else np.zeros((0, size, size), dtype=np.float32)
        return ImageScores(scores=scores, maps=stacked)

    # -------------------------------------------------------------------------------------------- calibration
    def calibrate(
        self,
        normal_images: Sequence[np.ndarray],
        specificity: float | None = None,
        info: Sequence[ImageInfo] | None = None,
    ) -> dict[str, float]:
        """Set thresholds from held-out normal images: the method's statistics and image threshold at
        ``specificity`` (default from the config), pixel threshold at the ``pixel_quantile`` of the normal maps'
        foreground pixels."""
        cfg = self.config
        if specificity is not None:
            cfg.specificity = float(specificity)
        prepared = self.prepare_all(normal_images, info)
        if not prepared:
            raise DetectorError("no normal images to calibrate on")
        found = self.method.calibrate(prepared, cfg.specificity)
        cfg.score_stats.update(found.statistics)
        self.record(found.extra)
        cfg.image_threshold = found.image_threshold
        scores, maps = found.scores, found.maps
        masks = np.stack([p.mask for p in prepared])
        fg = maps[masks] if masks.any() else maps.ravel()
        cfg.pixel_threshold = float(np.quantile(fg, cfg.pixel_quantile))
        stats = {
            "n_normals": len(prepared),
            "image_threshold": cfg.image_threshold,
            "pixel_threshold": cfg.pixel_threshold,
            "normal_score_mean": float(scores.mean()),
            "normal_score_std": float(scores.std()),
        }
        cfg.extra["calibration"] = {**stats, "normal_scores": sorted(float(v) for v in scores)}
        return stats

    # ----------------------------------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.method.state()

    def save(self, model_dir: Path, card: dict[str, Any] | None = None) -> None:
        """Write weights.safetensors, model_card.json and MODEL_CARD.md (models.card)."""
        merged = {**self.card_defaults, **self.card, **(card or {})}
        self.weights_sha256 = write_model(model_dir, self.config, self.tensors(), merged, self.method.card_thresholds())
        self.card = merged

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device | None = "cpu") -> Self:
        config, tensors, digest, card = read_model(model_dir)
        detector = cls(config, device)
        detector.weights_sha256 = digest
        detector.method.load_state(tensors)
        detector.card = card
        return detector


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
