"""Extra evaluation for radiographs: AUROC per view (AP, PA) and the localisation hit rate against lesion boxes.

``--labels CSV``: columns ``file`` (image file name) and ``view``; images whose name is not in the file, or whose
view is neither AP nor PA, count only in the overall numbers.
``--boxes CSV``: columns ``file``, ``x``, ``y``, ``w``, ``h`` (pixels of the image as the boxes were drawn; optional
``width`` column of that image, default 1024 as in NIH ChestX-ray14 and RSNA, scaled to the file's own size). An
abnormal image counts as a hit when its map maximum falls inside one of its boxes.
No torch here: works on scores and maps.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.models.labels import VIEWS, read_labels
from dicom_node.models.metrics import auroc, average_precision, sensitivity_specificity, threshold_at_specificity
from dicom_node.models.regions import map_maximum


def read_views(path: Path) -> dict[str, str]:
    """file name → view (upper case) from a CSV with columns ``file`` and ``view`` (:func:`models.labels.read_labels`
    reads it)."""
    with open(path, newline="", encoding="utf-8") as handle:
        if "view" not in (csv.DictReader(handle).fieldnames or []):
            raise ValueError(f"{path}: needs columns 'file' and 'view'")
    return {name: info.view or "" for name, info in read_labels(path).items()}


def read_boxes(path: Path, default_width: float = 1024.0) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """file name → [(x, y, w, h, width of the image the box was drawn on)]."""
    boxes: dict[str, list[tuple[float, float, float, float, float]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "x", "y", "w", "h"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns 'file', 'x', 'y', 'w', 'h'")
        for row in reader:
            width = float(row.get("width") or default_width)
            boxes[row["file"]].append((float(row["x"]), float(row["y"]), float(row["w"]), float(row["h"]), width))
    return dict(boxes)


def per_view_metrics(
    files: Sequence[Path],
    labels: np.ndarray,
    scores: np.ndarray,
    views: dict[str, str],
    threshold: float,
) -> dict[str, dict[str, Any]]:
    """{view: {image_auroc, image_ap, sensitivity, specificity, n_normal, n_abnormal}} for AP and PA."""
    file_views = np.array([views.get(Path(f).name, "") for f in files])
    out: dict[str, dict[str, Any]] = {}
    for view in VIEWS:
        chosen = file_views == view
        y, s = labels[chosen], scores[chosen]
        entry: dict[str, Any] = {"n_normal": int((~y).sum()), "n_abnormal": int(y.sum())}
        if y.any() and (~y).any():
            sens, spec = sensitivity_specificity(y, s, threshold)
            entry.update(image_auroc=auroc(y, s), image_ap=average_precision(y, s), sensitivity=sens, specificity=spec)
            entry.update(
                {f"sensitivity_at_{int(q * 100)}": sensitivity_at_specificity(s[y], s[~y], q) for q in (0.9, 0.95)}
            )
        else:
            entry.update(image_auroc=None, image_ap=None, sensitivity=None, specificity=None)
            entry.update(sensitivity_at_90=None, sensitivity_at_95=None)
        out[view] = entry
    return out


def sensitivity_at_specificity(abnormal: np.ndarray, normal: np.ndarray, specificity: float) -> float:
    """Share of the abnormal scores above the threshold that holds ``specificity`` on these normals (the threshold a
    site would set on them: ``models.metrics.threshold_at_specificity``)."""
    threshold = threshold_at_specificity(normal, specificity)
    return float((abnormal >= threshold).mean())


def localisation_hit_rate(
    files: Sequence[Path],
    maps: Sequence[np.ndarray],
    boxes: dict[str, list[tuple[float, float, float, float, float]]],
) -> dict[str, Any]:
    """Share of the images with boxes whose map maximum lies inside one of their boxes."""
    hits = 0
    counted = 0
    for path, amap in zip(files, maps, strict=True):
        entries = boxes.get(Path(path).name)
        if not entries:
            continue
        col, row = map_maximum(amap)
        col, row = col + 0.5, row + 0.5  # pixel centre
        counted += 1
        for x, y, w, h, width in entries:
            scale = amap.shape[1] / width
            if x * scale <= col <= (x + w) * scale and y * scale <= row <= (y + h) * scale:
                hits += 1
                break
    return {"localisation_hit_rate": hits / counted if counted else None, "n_with_boxes": counted}


def format_per_view(per_view: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'view':<6} {'n_norm':>6} {'n_abn':>6} {'auroc':>7} {'ap':>7} {'sens':>7} {'spec':>7} "
        f"{'sens@90':>7} {'sens@95':>7}"
    ]
    for view, entry in per_view.items():

        def fmt(key: str, entry: dict[str, Any] = entry) -> str:
            value = entry.get(key)
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"{view:<6} {entry['n_normal']:>6} {entry['n_abnormal']:>6} {fmt('image_auroc'):>7} "
            f"{fmt('image_ap'):>7} {fmt('sensitivity'):>7} {fmt('specificity'):>7} "
            f"{fmt('sensitivity_at_90'):>7} {fmt('sensitivity_at_95'):>7}"
        )
    return "\n".join(lines)
