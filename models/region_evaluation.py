"""Region-level figures: what a reader would see as regions, scored against lesion masks or boxes (issue 19).

An image's regions are the product's (models.regions.select_regions with the given rules on the detector's map, in the
image's own geometry): none unless the image is scored Abnormal at the calibrated image threshold ("one decision, one
story"), else at least one. A region is *on the lesion* when it overlaps the lesion mask (or one of the lesion boxes)
by at least one pixel.

Figures: ``fp_regions_per_normal`` (regions on normal images / normal images), ``lesion_region_rate`` (share of the
abnormal images with a lesion truth that have a region on the lesion; an abnormal image scored Normal has no region,
so it counts as a miss), ``lesion_region_rate_flagged`` (the same among the abnormal images scored Abnormal),
``regions_per_abnormal`` (regions / abnormal images) and ``regions_per_flagged_abnormal``. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.models.regions import RegionRules, rules_for, select_regions

REGION_KEYS = (
    "fp_regions_per_normal",
    "lesion_region_rate",
    "lesion_region_rate_flagged",
    "regions_per_abnormal",
    "regions_per_flagged_abnormal",
)

Box = tuple[float, float, float, float, float]  # x, y, w, h, width of the image the box was drawn on


@dataclass(frozen=True)
class ImageRegions:
    """One image's regions: how many, whether the image was scored Abnormal, and whether a region touches the lesion
    (None when the image has no lesion truth)."""

    count: int
    flagged: bool
    on_lesion: bool | None


def image_regions(
    anomaly_map: np.ndarray,
    score: float,
    image_threshold: float,
    pixel_threshold: float,
    spacing_yx: tuple[float, float],
    lesion: np.ndarray | None = None,
    rules: RegionRules | None = None,
) -> ImageRegions:
    """The regions of one scored image by the product's rules, checked against ``lesion`` (bool, the map's shape;
    None or all-False: no lesion truth)."""
    flagged = bool(score >= image_threshold)
    amap = np.asarray(anomaly_map, dtype=np.float32)
    regions = select_regions(
        amap[np.newaxis], pixel_threshold, (1.0, *spacing_yx), abnormal=flagged, rules=rules or RegionRules()
    )
    on_lesion: bool | None = None
    if lesion is not None and np.any(lesion):
        if lesion.shape != amap.shape:
            raise ValueError(f"lesion mask {lesion.shape} and map {amap.shape} differ in shape")
        on_lesion = any(bool(np.any(region.mask[0] & lesion)) for region in regions)
    return ImageRegions(count=len(regions), flagged=flagged, on_lesion=on_lesion)


def box_mask(shape: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """The pixels of an image of ``shape`` whose centres lie in one of ``boxes`` (scaled from the width they were
    drawn at to the image's width)."""
    mask = np.zeros(shape, dtype=bool)
    rows, cols = shape
    centres_r = np.arange(rows) + 0.5
    centres_c = np.arange(cols) + 0.5
    for x, y, w, h, width in boxes:
        scale = cols / width
        in_r = (centres_r >= y * scale) & (centres_r <= (y + h) * scale)
        in_c = (centres_c >= x * scale) & (centres_c <= (x + w) * scale)
        mask |= in_r[:, None] & in_c[None, :]
    return mask


def region_metrics(normal: Sequence[ImageRegions], abnormal: Sequence[ImageRegions]) -> dict[str, Any]:
    """The figures of :data:`REGION_KEYS` (None where a denominator is empty) plus their counts."""

    def ratio(numerator: float, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    truth = [a for a in abnormal if a.on_lesion is not None]
    flagged_truth = [a for a in truth if a.flagged]
    flagged = [a for a in abnormal if a.flagged]
    return {
        "fp_regions_per_normal": ratio(sum(n.count for n in normal), len(normal)),
        "lesion_region_rate": ratio(sum(bool(a.on_lesion) for a in truth), len(truth)),
        "lesion_region_rate_flagged": ratio(sum(bool(a.on_lesion) for a in flagged_truth), len(flagged_truth)),
        "regions_per_abnormal": ratio(sum(a.count for a in abnormal), len(abnormal)),
        "regions_per_flagged_abnormal": ratio(sum(a.count for a in flagged), len(flagged)),
        "normal_images_with_region": ratio(sum(n.count > 0 for n in normal), len(normal)),
        "n_lesion_truth": len(truth),
        "n_flagged_lesion_truth": len(flagged_truth),
        "n_flagged_abnormal": len(flagged),
    }


def evaluate_regions(
    normal: tuple[Sequence[Path], np.ndarray, Sequence[np.ndarray]],
    abnormal: tuple[Sequence[Path], np.ndarray, Sequence[np.ndarray]],
    image_threshold: float,
    pixel_threshold: float,
    spacing_for: Callable[[tuple[int, int]], tuple[float, float]],
    lesion_for: Callable[[Path, tuple[int, int]], np.ndarray | None],
    rules: RegionRules | None = None,
    detector: str | None = None,
) -> dict[str, Any]:
    """Region figures of scored images: each of ``normal`` and ``abnormal`` is (files, scores, maps);
    ``spacing_for(map shape)`` gives (row, column) mm; ``lesion_for(file, map shape)`` the lesion mask or None.
    ``rules`` default to the detector's (``models.regions.rules_for(detector)``), as in the result objects."""
    rules = rules if rules is not None else rules_for(detector)

    def run(files: Sequence[Path], scores: np.ndarray, maps: Sequence[np.ndarray], truth: bool) -> list[ImageRegions]:
        out = []
        for path, score, amap in zip(files, scores, maps, strict=True):
            shape = (int(amap.shape[0]), int(amap.shape[1]))
            lesion = lesion_for(Path(path), shape) if truth else None
            out.append(
                image_regions(amap, float(score), image_threshold, pixel_threshold, spacing_for(shape), lesion, rules)
            )
        return out

    return region_metrics(run(*normal, truth=False), run(*abnormal, truth=True))


def format_region_report(report: dict[str, Any]) -> str:
    lines = []
    for key in REGION_KEYS:
        value = report.get(key)
        text = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"{key:<30} {text}")
    lines.append(
        f"{'(n lesion truth / flagged)':<30} {report.get('n_lesion_truth')} / {report.get('n_flagged_lesion_truth')}"
    )
    return "\n".join(lines)
