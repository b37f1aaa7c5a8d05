"""Fit, calibrate and record: the functions behind ``dicom-node fit|calibrate|evaluate``."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.models.base import DetectorError
from dicom_node.models.image_detector import ImageAnomalyDetector
from dicom_node.models.labels import info_for, read_labels
from dicom_node.models.preprocessing import list_image_files, load_image_file
from dicom_node.models.registry import detector_class

logger = logging.getLogger(__name__)


def image_files(directories: Sequence[Path]) -> list[Path]:
    files = [f for d in directories for f in list_image_files(Path(d))]
    if not files:
        raise DetectorError(f"no PNG/JPG/DICOM images in {', '.join(str(d) for d in directories)}")
    return files


def new_detector(
    name: str,
    device: str = "cpu",
    spade: dict[str, Any] | None = None,
    segmenter: dict[str, Any] | None = None,
    **overrides: Any,
) -> ImageAnomalyDetector:
    """An unfitted detector of kind ``name`` with its default configuration, fields overridden by ``overrides``,
    SPADE settings (``config.extra["spade"]``) by ``spade`` and lesion-segmenter settings
    (``config.extra["segmenter"]``) by ``segmenter`` (None values ignored in all three)."""
    cls, config = detector_class(name)
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(config, key):
            raise DetectorError(f"unknown option {key!r} for {name}")
        setattr(config, key, value)
    for section, given in (("spade", spade), ("segmenter", segmenter)):
        settings = {key: value for key, value in (given or {}).items() if value is not None}
        if settings:
            config.extra[section] = {**config.extra.get(section, {}), **settings}
    return cls(config, device)


def fit_detector(
    name: str,
    normal_dirs: Sequence[Path],
    out: Path,
    calibration_dirs: Sequence[Path] = (),
    specificity: float = 0.95,
    device: str = "cpu",
    holdout_fraction: float = 0.1,
    spade: dict[str, Any] | None = None,
    segmenter: dict[str, Any] | None = None,
    labels: Path | None = None,
    **overrides: Any,
) -> ImageAnomalyDetector:
    """Fit on the normals, calibrate on ``calibration_dirs`` (or a held-out share of the normals), save to ``out``.
    ``labels``: CSV of the images' views and patients (:mod:`models.labels`; DICOM files need none)."""
    detector = new_detector(name, device, spade, segmenter, **overrides)
    files = image_files(normal_dirs)
    if calibration_dirs:
        train_files, calibration_files = files, image_files(calibration_dirs)
    else:
        shuffled = files[:]
        random.Random(detector.config.seed).shuffle(shuffled)
        cut = max(1, int(round(holdout_fraction * len(shuffled))))
        calibration_files, train_files = shuffled[:cut], shuffled[cut:]
        logger.info("no calibration folder: holding out %d of %d normals for thresholds", cut, len(files))
    logger.info("fitting %s (%s) on %d normal images", name, detector.config.method, len(train_files))
    table = read_labels(labels) if labels is not None else None
    detector.fit((load_image_file(f) for f in train_files), info=info_for(train_files, table))
    calibration_info = info_for(calibration_files, table)
    stats = detector.calibrate([load_image_file(f) for f in calibration_files], specificity, calibration_info)
    detector.card["training_images"] = len(train_files)
    detector.card["calibration_images"] = len(calibration_files)
    detector.card["training_folders"] = [str(d) for d in normal_dirs]
    detector.card["calibration_folders"] = [str(d) for d in calibration_dirs] or ["held-out share of the normals"]
    detector.save(out)
    logger.info("saved %s to %s: %s", name, out, stats)
    return detector


def calibrate_detector(
    detector: ImageAnomalyDetector,
    normal_dirs: Sequence[Path],
    specificity: float,
    out: Path,
    pixel_quantile: float | None = None,
    labels: Path | None = None,
) -> dict[str, float]:
    """Recalibrate thresholds on a site's own normal images and save the model (weights unchanged) to ``out``.
    ``labels``: CSV of the images' views (:mod:`models.labels`); DICOM files carry theirs in View Position."""
    if pixel_quantile is not None:
        detector.config.pixel_quantile = float(pixel_quantile)
    files = image_files(normal_dirs)
    table = read_labels(labels) if labels is not None else None
    stats = detector.calibrate([load_image_file(f) for f in files], specificity, info_for(files, table))
    detector.card["calibration_folders"] = [str(d) for d in normal_dirs]
    detector.card["calibration_images"] = len(files)
    detector.save(out)
    return stats


def summarise_scores(scores: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(scores)),
        "p50": float(np.percentile(scores, 50)),
        "p95": float(np.percentile(scores, 95)),
        "max": float(np.max(scores)),
    }
