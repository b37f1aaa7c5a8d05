"""A test-only detector for the worker tests (never shipped; the product registers only brain_mri and chest_xray).

Installed into worker subprocesses through the ``dicom_node.detectors`` entry point group by the fixture in
tests/test_workers.py (a throw-away ``.dist-info`` on PYTHONPATH). It scores slices by a simple intensity statistic
so the whole path (read, batch, save, record) runs for real, and it misbehaves on request: ``behaviour.json`` in
its model directory maps a Series Instance UID to ``{"sleep": seconds}`` (with ``"ignore_soft_limit": true``
it keeps sleeping through Celery's soft time limit, like native code that never returns to Python) or
``{"raise": "message"}``. Each call of
``score_series`` first writes ``started/<series uid>.<pid>`` so a test can tell that a job is mid-flight, and by
which process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.models.base import Detector, DetectorError, ImageScores, ModelIdentity, SeriesResult


class IntensityTestDetector(Detector):
    def __init__(self, name: str, model_dir: Path, device: str) -> None:
        self.name = name
        self.model_dir = model_dir
        self.device = device
        self.batch_size = 4
        self.batches: list[int] = []

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(detector=self.name, method="test-intensity", version="test-1", weights_sha256="0" * 64)

    @property
    def image_threshold(self) -> float:
        return 0.5

    @property
    def pixel_threshold(self) -> float:
        return 0.9

    def score_images(self, images: Sequence[np.ndarray]) -> ImageScores:
        maps = np.stack([np.abs(image - image.mean()) for image in images]).astype(np.float32)
        return ImageScores(scores=maps.reshape(len(images), -1).mean(axis=1), maps=maps)

    def _behave(self, series_uid: str) -> None:
        started = self.model_dir / "started"
        started.mkdir(exist_ok=True)
        (started / f"{series_uid}.{os.getpid()}").touch()
        behaviour_file = self.model_dir / "behaviour.json"
        behaviour = json.loads(behaviour_file.read_text()) if behaviour_file.exists() else {}
        action = behaviour.get(series_uid, {})
        if "sleep" in action:
            deadline = time.monotonic() + float(action["sleep"])
            while time.monotonic() < deadline:
                try:
                    time.sleep(max(deadline - time.monotonic(), 0))
                except Exception as err:  # Celery's SoftTimeLimitExceeded
                    if not action.get("ignore_soft_limit"):
                        raise
                    print(f"ignoring {type(err).__name__}, like a detector stuck in native code")
        if "raise" in action:
            raise DetectorError(str(action["raise"]))

    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        if not datasets:
            raise DetectorError("empty series")
        self._behave(str(datasets[0].SeriesInstanceUID))
        images = []
        for ds in datasets:
            pixels = ds.pixel_array.astype(np.float32)
            span = float(pixels.max() - pixels.min()) or 1.0
            images.append((pixels - pixels.min()) / span)
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            self.batches.append(len(batch))
            scored = self.score_images(batch)
            scores.append(scored.scores)
            maps.append(scored.maps)
        image_scores = np.concatenate(scores)
        return SeriesResult(
            model=self.identity,
            series_score=float(image_scores.max()),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            image_scores=image_scores,
            anomaly_maps=np.concatenate(maps),
            scored=np.ones(len(datasets), dtype=bool),
        )

    def save(self, model_dir: Path) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "model_card.json").write_text(json.dumps({"version": self.identity.version}))


def load_brain(model_dir: Path | None, device: str) -> Detector:
    if model_dir is None:
        raise DetectorError("the test detector needs detectors.brain_mri.model_dir")
    return IntensityTestDetector("brain_mri", Path(model_dir), device)


def load_chest(model_dir: Path | None, device: str) -> Detector:
    if model_dir is None:
        raise DetectorError("the test detector needs detectors.chest_xray.model_dir")
    return IntensityTestDetector("chest_xray", Path(model_dir), device)
