"""Finding regions from an anomaly map: a mask for the SEG and a closed polygon for the SR (TID 1410).

Plain numpy/scipy (no torch), so the result builders can call it. The map must be in the source image's geometry
(a ``SeriesResult`` map: Rows x Columns of the instance). Polygons are given as (column, row) pixel coordinates of
the source image, closed (the last point equals the first), as DICOM SCOORD POLYLINE wants for a closed region
(PS3.3 C.18.6.1.2: the first and last point of a closed polyline are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    """One connected finding: ``mask`` (rows, cols) bool in source geometry, ``polygon`` (k, 2) float (column, row)
    closed convex outline of the mask, ``score`` the map maximum inside it, ``area_pixels`` its pixel count."""

    mask: np.ndarray
    polygon: np.ndarray
    score: float
    area_pixels: int

    @property
    def centroid(self) -> tuple[float, float]:
        """(column, row) of the mask's centre of mass."""
        rows, cols = np.nonzero(self.mask)
        return float(cols.mean()), float(rows.mean())


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain on (x, y) points; returns the hull counter-clockwise without repeating the start."""
    pts = np.unique(points, axis=0)
    if len(pts) <= 2:
        return pts.astype(np.float64)
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    lower = half(pts)
    upper = half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """Closed convex outline (column, row) of a boolean mask, through the outer corners of its boundary pixels."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    # Corners of every pixel on the boundary, so a one-pixel mask still gives a unit square.
    boundary = mask & ~ndimage.binary_erosion(mask)
    br, bc = np.nonzero(boundary)
    corners = np.concatenate([np.stack([bc + dx, br + dy], axis=1) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)], axis=0)
    hull = _convex_hull(corners)
    return np.vstack([hull, hull[:1]])


def find_regions(
    anomaly_map: np.ndarray,
    threshold: float,
    min_area_fraction: float = 0.0005,
    max_regions: int = 5,
) -> list[Region]:
    """Connected regions of ``anomaly_map >= threshold``, largest score first.

    Regions smaller than ``min_area_fraction`` of the image are dropped (speckle); at most ``max_regions`` are
    returned. An empty list means nothing at or above the threshold."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {amap.shape}")
    above = amap >= threshold
    if not above.any():
        return []
    labels, count = ndimage.label(above)
    min_area = max(1, int(round(min_area_fraction * amap.size)))
    index = np.arange(1, count + 1)
    areas = ndimage.sum(above, labels, index=index)
    peaks = ndimage.maximum(amap, labels, index=index)
    order = np.argsort(-np.asarray(peaks))
    regions: list[Region] = []
    for i in order:
        if areas[i] < min_area:
            continue
        mask = labels == (i + 1)
        regions.append(Region(mask=mask, polygon=polygon_of(mask), score=float(peaks[i]), area_pixels=int(areas[i])))
        if len(regions) >= max_regions:
            break
    return regions


def map_maximum(anomaly_map: np.ndarray) -> tuple[float, float]:
    """(column, row) of the map's maximum (the first one when tied)."""
    row, col = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    return float(col), float(row)
