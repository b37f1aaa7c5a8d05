"""The toy knee detector's model code: numpy only. A pixel's anomaly is its brightness in the series' 8-bit
normalised image; an image's score is the fraction of pixels above the pixel threshold."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.models.base import Detector, DetectorError, ImageScores, ModelIdentity, SeriesResult

from . import SPEC


class ToyKneeDetector(Detector):
    name = "knee_xray"

    def __init__(self, model_dir: Path) -> None:
        card = json.loads((model_dir / "model_card.json").read_text())
        self.model_dir = model_dir
        self.version = str(card["version"])
        self.batch_size = 1

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(detector=self.name, method="toy-intensity", version=self.version, weights_sha256="0" * 64)

    @property
    def image_threshold(self) -> float:
        return 0.01

    @property
    def pixel_threshold(self) -> float:
        return 0.9

    def score_images(self, images: Sequence[np.ndarray]) -> ImageScores:
        maps = np.stack([np.asarray(image, dtype=np.float32) for image in images])
        return ImageScores(scores=(maps >= self.pixel_threshold).reshape(len(images), -1).mean(axis=1), maps=maps)

    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        if not datasets:
            raise DetectorError("empty series")
        images = []
        for ds in datasets:
            pixels = ds.pixel_array.astype(np.float32)
            if ds.get("PhotometricInterpretation") == "MONOCHROME1":
                pixels = pixels.max() - pixels
            span = float(pixels.max() - pixels.min()) or 1.0
            images.append((pixels - pixels.min()) / span)
        scored = self.score_images(images)
        return SeriesResult(
            model=self.identity,
            series_score=float(scored.scores.max()),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            image_scores=scored.scores.astype(np.float64),
            anomaly_maps=scored.maps,
            scored=np.ones(len(datasets), dtype=bool),
        )

    def save(self, model_dir: Path) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "model_card.json").write_text(json.dumps({"version": self.version}))


def load_knee_xray(model_dir: Path | None, device: str) -> Detector:
    return ToyKneeDetector(Path(model_dir) if model_dir is not None else SPEC.weights or Path())
