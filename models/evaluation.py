"""Evaluate a detector on folders of normal and abnormal images (PNG, JPG or DICOM), optionally with masks.

Image level: AUROC, AP, and sensitivity/specificity at the model's calibrated image threshold. Pixel level (when a
masks folder is given; mask files have the images' names, nonzero = abnormal; images without a mask file count as
all-normal): pixel AUROC and AP over all pixels of all evaluated images, and Dice of ``map >= pixel threshold``
against the masks, pooled over all those pixels. ``images_per_s`` counts preparation, backbone and scoring (not
file decoding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dicom_node.models.base import ImageInfo
from dicom_node.models.image_detector import ImageAnomalyDetector
from dicom_node.models.labels import info_for
from dicom_node.models.metrics import auroc, average_precision, dice, sensitivity_specificity
from dicom_node.models.preprocessing import list_image_files, load_image_file, resize

REPORT_KEYS = (
    "image_auroc",
    "image_ap",
    "sensitivity",
    "specificity",
    "pixel_auroc",
    "pixel_ap",
    "dice",
    "images_per_s",
)
MAX_PIXELS_PER_IMAGE = 256 * 256  # maps and masks are compared at most at this resolution


@dataclass
class Scored:
    files: list[Path]
    scores: np.ndarray
    maps: list[np.ndarray]
    seconds: float


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    return [load_image_file(p) for p in paths]


def score_files(
    detector: ImageAnomalyDetector,
    files: Sequence[Path],
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
    known: Mapping[str, ImageInfo] | None = None,
) -> Scored:
    """Score ``files`` in batches; each image with what ``known`` or its DICOM header says about it (its view)."""
    scores: list[float] = []
    maps: list[np.ndarray] = []
    seconds = 0.0
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        images = load_images(chunk)
        began = time.perf_counter()
        s, m = detector.score_each(images, info_for(chunk, known))
        seconds += time.perf_counter() - began
        scores.extend(float(v) for v in s)
        maps.extend(m)
        if progress:
            progress(len(scores))
    return Scored(files=list(files), scores=np.asarray(scores), maps=maps, seconds=seconds)


def mask_for(masks_dirs: Sequence[Path], image_file: Path, shape: tuple[int, int]) -> np.ndarray:
    """The lesion mask of ``image_file`` (same file name, any extension, nonzero = lesion) from the first of
    ``masks_dirs`` that has one; an all-false ``shape`` mask where none has (normal images may have none)."""
    candidates = [c for d in masks_dirs for c in (d / image_file.name, *sorted(d.glob(image_file.stem + ".*")))]
    for candidate in candidates:
        if candidate.is_file():
            with Image.open(candidate) as img:
                return np.asarray(img.convert("L")) > 0
    return np.zeros(shape, dtype=bool)


def _pixel_pairs(scored: Scored, masks_dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(truth, map values) over all pixels, at the mask resolution (capped at MAX_PIXELS_PER_IMAGE)."""
    truths, values = [], []
    for path, amap in zip(scored.files, scored.maps, strict=True):
        truth = mask_for(masks_dirs, path, amap.shape)
        if truth.shape != amap.shape:
            amap = resize(amap, truth.shape)
        if truth.size > MAX_PIXELS_PER_IMAGE:
            factor = float(np.sqrt(MAX_PIXELS_PER_IMAGE / truth.size))
            shape = (max(1, int(truth.shape[0] * factor)), max(1, int(truth.shape[1] * factor)))
            truth = resize(truth.astype(np.float32), shape, order=0) > 0.5
            amap = resize(amap, shape)
        truths.append(truth.ravel())
        values.append(amap.ravel())
    return np.concatenate(truths), np.concatenate(values)


def evaluate(
    detector: ImageAnomalyDetector,
    normal_dirs: Sequence[Path],
    abnormal_dirs: Sequence[Path],
    masks_dirs: Sequence[Path] = (),
    progress: Callable[[int], None] | None = None,
    scored_out: list[Scored] | None = None,
    known: Mapping[str, ImageInfo] | None = None,
) -> dict[str, Any]:
    """Metrics of ``detector`` on the folders; keys :data:`REPORT_KEYS` plus counts and thresholds. ``known``: what
    is known of each file by name (:func:`models.labels.read_labels`), used in scoring as a DICOM header would be.

    ``scored_out``, when given, receives the normal and the abnormal :class:`Scored` (for per-view metrics)."""
    normal_files = [f for d in normal_dirs for f in list_image_files(Path(d))]
    abnormal_files = [f for d in abnormal_dirs for f in list_image_files(Path(d))]
    if not normal_files or not abnormal_files:
        raise ValueError("evaluate needs at least one normal and one abnormal image")
    normal = score_files(detector, normal_files, progress=progress, known=known)
    abnormal = score_files(detector, abnormal_files, progress=progress, known=known)
    if scored_out is not None:
        scored_out.extend((normal, abnormal))
    labels = np.r_[np.zeros(len(normal_files), dtype=bool), np.ones(len(abnormal_files), dtype=bool)]
    scores = np.r_[normal.scores, abnormal.scores]
    sens, spec = sensitivity_specificity(labels, scores, detector.image_threshold)
    report: dict[str, Any] = {
        "image_auroc": auroc(labels, scores),
        "image_ap": average_precision(labels, scores),
        "sensitivity": sens,
        "specificity": spec,
        "pixel_auroc": None,
        "pixel_ap": None,
        "dice": None,
        "images_per_s": len(scores) / max(normal.seconds + abnormal.seconds, 1e-9),
        "n_normal": len(normal_files),
        "n_abnormal": len(abnormal_files),
        "image_threshold": detector.image_threshold,
        "pixel_threshold": detector.pixel_threshold,
    }
    if masks_dirs:
        truths, values = [], []
        for scored in (normal, abnormal):
            t, v = _pixel_pairs(scored, [Path(d) for d in masks_dirs])
            truths.append(t)
            values.append(v)
        truth = np.concatenate(truths)
        value = np.concatenate(values)
        if truth.any():
            report["pixel_auroc"] = auroc(truth, value)
            report["pixel_ap"] = average_precision(truth, value)
            report["dice"] = dice(value >= detector.pixel_threshold, truth)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable two-column table."""
    lines = []
    for key in (*REPORT_KEYS, "n_normal", "n_abnormal", "image_threshold", "pixel_threshold"):
        value = report.get(key)
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"{key:<18} {text}")
    return "\n".join(lines)
