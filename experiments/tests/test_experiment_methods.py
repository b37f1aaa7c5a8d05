"""Smoke tests of the experimental methods (not part of `make test`; run from the repository root with
``.venv/bin/pytest experiments/tests``): each fits on a few synthetic heads, calibrates, scores, and gives the same
scores after save and load; the installed package never imports experiments/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.models.base import DetectorError
from dicom_node.models.brain_mri.detector import BrainMRIDetector, default_config
from experiments.detectors import EXPERIMENT_METHODS, ExperimentalBrainDetector

ROOT = Path(__file__).resolve().parents[2]


def _heads(count: int = 6, rows: int = 96, cols: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:rows, 0:cols]
    out = []
    for i in range(count):
        inside = ((y - rows / 2) / (0.42 * rows)) ** 2 + ((x - cols / 2) / (0.4 * cols)) ** 2 < 1
        texture = 0.5 + 0.2 * np.sin(x / (3.0 + i)) * np.cos(y / 4.0) + 0.05 * rng.standard_normal((rows, cols))
        out.append(np.clip(np.where(inside, texture, 0.0), 0, 1).astype(np.float32))
    return out


@pytest.mark.parametrize("method", sorted(EXPERIMENT_METHODS))
def test_method_fits_calibrates_scores_and_round_trips(method: str, tmp_path: Path) -> None:
    config = default_config()
    config.method, config.image_size, config.batch_size, config.coreset_size = method, 64, 4, 200
    config.extra["msde"] = {"k": 2, "pca_dim": 8}
    config.extra["ae_max_epochs"] = 1
    images = _heads()
    detector = ExperimentalBrainDetector(config)
    detector.fit(images[:4])
    detector.calibrate(images[4:])
    scores, maps = detector.score_each(images[:2])
    assert scores.shape == (2,) and np.isfinite(scores).all() and maps[0].shape == images[0].shape
    detector.save(tmp_path / "model")
    loaded = ExperimentalBrainDetector.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.score_each(images[:2])[0], scores, rtol=1e-4, atol=1e-5)


def test_the_installed_detectors_do_not_offer_them() -> None:
    config = default_config()
    config.method = "patchcore"
    with pytest.raises(DetectorError, match="experiments"):
        BrainMRIDetector(config)


def test_the_installed_package_never_imports_experiments() -> None:
    code = (
        "import sys, dicom_node.cli, dicom_node.models.training\n"
        "import dicom_node.models.brain_mri.detector, dicom_node.models.chest_xray.detector\n"
        "print(any(m == 'experiments' or m.startswith('experiments.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
