"""Finding regions from an anomaly map, once for the whole product (the result objects, ``dicom-node evaluate``,
the benchmarks): :func:`select_regions` gives the masks for the SEG, :func:`polygon_of` the closed outline for the
SR (TID 1410).

Plain numpy/scipy (no torch), so the result builders can call it. The map must be in the source image's geometry
(a ``SeriesResult`` map: Rows x Columns of the instance). Polygons are given as (column, row) pixel coordinates of
the source image, closed (the last point equals the first), as DICOM SCOORD POLYLINE wants for a closed region
(PS3.3 C.18.6.1.2: the first and last point of a closed polyline are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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


def map_maximum(anomaly_map: np.ndarray) -> tuple[float, float]:
    """(column, row) of the map's maximum (the first one when tied)."""
    row, col = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    return float(col), float(row)


# ------------------------------------------------------------------------------------------------------------------
# The region rules every result object and the region-level evaluation share (issue 19): regions exist only for an
# Abnormal verdict, lie inside the field the detector reads, have a minimum size in mm, are ranked by their evidence
# and capped; an Abnormal verdict always has at least one region (the evidence that made the score).


@dataclass(frozen=True)
class RegionRules:
    """How regions are chosen from an anomaly map.

    ``max_regions``: at most this many regions, strongest evidence first. ``min_size_mm``: a region's equivalent
    diameter (of the disc or sphere with its area or volume) must reach this. ``margin_mm``: the detector's field
    (where its map is non-zero: the head foreground in MR, the lung fields in a radiograph) is shrunk by this much
    so that edge artefacts at the skin or the field border are not regions. ``evidence_percentiles``: when a series
    is Abnormal but no region passes the pixel threshold, the region around the map maximum at the first of these
    percentiles (of the map inside the field) whose region reaches the minimum size. ``cranial_extent_mm``: in a
    head volume with patient coordinates, the field ends this far below its top (the vertex), which keeps the brain,
    brainstem and cerebellum and leaves out the neck (None: no limit). ``min_evidence_ratio``: a region after the
    first is kept only with at least this share of the first's evidence, so that the cap is not filled with faint
    regions beside the one that drives the score (0: keep up to ``max_regions``)."""

    max_regions: int = 3
    min_size_mm: float = 5.0
    margin_mm: float = 3.0
    evidence_percentiles: tuple[float, ...] = (99.0, 98.0, 95.0, 90.0, 75.0)
    cranial_extent_mm: float | None = 140.0
    min_evidence_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.max_regions < 1:
            raise ValueError("max_regions must be at least 1 (an Abnormal result needs a region)")
        if self.min_size_mm < 0 or self.margin_mm < 0:
            raise ValueError("min_size_mm and margin_mm must not be negative")
        if not 0.0 <= self.min_evidence_ratio <= 1.0:
            raise ValueError("min_evidence_ratio must be between 0 and 1")


def rules_for(detector: str | None) -> RegionRules:
    """The region rules of a detector: the defaults with its spec's ``region_rules`` (``DetectorSpec``); the
    defaults for an unknown detector or None."""
    from dicom_node.models import registry

    if detector is None or detector not in registry.names():
        return RegionRules()
    return RegionRules(**dict(registry.spec(detector).region_rules))


@dataclass(frozen=True)
class MapRegion:
    """One chosen region of a map stack (n, rows, cols): ``mask`` of the same shape; ``score`` the map maximum
    inside it; ``evidence`` the sum of the map above the level it was cut at (what ranks regions);
    ``size_mm`` its equivalent diameter; ``extent`` its area (mm², one image) or volume (mm³, a stack);
    ``above_threshold`` False for a region cut below the pixel threshold (the evidence of an Abnormal score);
    ``peak`` (frame, row, column) of its maximum."""

    mask: np.ndarray
    score: float
    evidence: float
    size_mm: float
    extent: float
    above_threshold: bool
    peak: tuple[int, int, int]


def equivalent_diameter(count: int, spacing: tuple[float, float, float], volume: bool) -> float:
    """Diameter (mm) of the sphere (``volume``) or disc with the region's volume or area."""
    dz, dy, dx = spacing
    if volume:
        return float((6.0 * count * dz * dy * dx / np.pi) ** (1.0 / 3.0))
    return float(np.sqrt(4.0 * count * dy * dx / np.pi))


def detector_field(
    maps: np.ndarray,
    spacing: tuple[float, float, float],
    margin_mm: float,
    *,
    superior: np.ndarray | None = None,
    cranial_extent_mm: float | None = None,
) -> np.ndarray:
    """Where the detector looked: its map is non-zero (maps are masked to the head or lung field), shrunk in-plane
    by ``margin_mm``; with ``superior`` (the patient's head-ward coordinate of every pixel, mm) and
    ``cranial_extent_mm``, only the part within that distance of the field's top. All True when the map is nowhere
    zero-masked (a detector without a field mask)."""
    field = maps > 0
    if not field.any():
        return np.ones(maps.shape, dtype=bool)
    if superior is not None and cranial_extent_mm is not None:
        top = float(superior[field].max())
        cranial = field & (superior >= top - cranial_extent_mm)
        if cranial.any():
            field = cranial
    _, dy, dx = spacing
    steps = int(round(margin_mm / max(min(dy, dx), 1e-6)))
    if steps > 0:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        shrunk = ndimage.binary_erosion(field, structure=structure, iterations=min(steps, 50))
        if shrunk.any():
            field = shrunk
    return field


def _components(mask: np.ndarray, volume: bool) -> tuple[np.ndarray, int]:
    if volume:
        return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    labels, count = ndimage.label(mask[0], structure=ndimage.generate_binary_structure(2, 1))
    return labels[np.newaxis], count


def _region(
    maps: np.ndarray, mask: np.ndarray, level: float, spacing: tuple[float, float, float], above: bool, volume: bool
) -> MapRegion:
    where = np.flatnonzero(mask)
    values = maps.ravel()[where]
    peak_index = np.unravel_index(int(where[int(np.argmax(values))]), maps.shape)
    count = int(where.size)
    dz, dy, dx = spacing
    return MapRegion(
        mask=mask,
        score=float(values.max()),
        evidence=float(np.clip(values - level, 0.0, None).sum()),
        size_mm=equivalent_diameter(count, spacing, volume),
        extent=float(count * dy * dx * (dz if volume else 1.0)),
        above_threshold=above,
        peak=(int(peak_index[0]), int(peak_index[1]), int(peak_index[2])),
    )


def select_regions(
    maps: np.ndarray,
    pixel_threshold: float,
    spacing: tuple[float, float, float],
    *,
    abnormal: bool,
    rules: RegionRules | None = None,
    superior: np.ndarray | None = None,
) -> list[MapRegion]:
    """The regions of a scored series (``maps`` (n, rows, cols), one image when n = 1), by the rules above.

    Normal → no region. Abnormal → the connected regions of ``maps >= pixel_threshold`` inside the detector's field
    (3-D, 6-connected, in a stack; 2-D, 4-connected, in one image) of at least ``min_size_mm``, ranked by evidence
    and capped; when none qualifies, the one region around the field's maximum at the highest evidence percentile
    that gives a region of the minimum size (else the largest of those tried), so every Abnormal result shows where
    its score came from. ``spacing`` is (slice, row, column) in mm; ``superior`` (optional, the maps' shape) the
    patient's head-ward coordinate of each pixel in mm, for ``rules.cranial_extent_mm``."""
    rules = rules or RegionRules()
    if not abnormal:
        return []
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"maps must be (n, rows, cols), got shape {maps.shape}")
    volume = maps.shape[0] > 1
    field = detector_field(maps, spacing, rules.margin_mm, superior=superior, cranial_extent_mm=rules.cranial_extent_mm)
    above = (maps >= pixel_threshold) & field
    labels, count = _components(above, volume)
    chosen: list[MapRegion] = []
    if count:
        # Per-component size and evidence over the voxels above the threshold only (a small share of the volume).
        inside = labels[above]
        sizes = np.bincount(inside, minlength=count + 1)
        evidence = np.bincount(inside, weights=maps[above] - pixel_threshold, minlength=count + 1)
        evidence[0] = -1.0
        evidence[sizes < max(_min_count(rules.min_size_mm, spacing, volume), 1)] = -1.0
        order = [int(label) for label in np.argsort(-evidence, kind="stable") if evidence[label] >= 0]
        if order:
            floor = rules.min_evidence_ratio * evidence[order[0]]
            order = [order[0], *(label for label in order[1:] if evidence[label] >= floor)]
        for label in order[: rules.max_regions]:
            chosen.append(_region(maps, labels == label, pixel_threshold, spacing, True, volume))
    if chosen:
        return chosen
    return [_evidence_region(maps, field, spacing, rules, volume)]


def _min_count(min_size_mm: float, spacing: tuple[float, float, float], volume: bool) -> int:
    """Pixels or voxels of the smallest region whose equivalent diameter reaches ``min_size_mm``."""
    dz, dy, dx = spacing
    if volume:
        return int(np.ceil((np.pi / 6.0) * min_size_mm**3 / (dz * dy * dx)))
    return int(np.ceil((np.pi / 4.0) * min_size_mm**2 / (dy * dx)))


def _evidence_region(
    maps: np.ndarray, field: np.ndarray, spacing: tuple[float, float, float], rules: RegionRules, volume: bool
) -> MapRegion:
    """The region around the field's maximum, cut at the highest percentile that makes it big enough."""
    inside = np.where(field, maps, -np.inf)
    peak = np.unravel_index(int(np.argmax(inside)), maps.shape)
    values = maps[field]
    min_count = _min_count(rules.min_size_mm, spacing, volume)
    best: tuple[np.ndarray, float] | None = None
    for percentile in rules.evidence_percentiles:
        level = min(float(np.percentile(values, percentile)), float(maps[peak]))
        labels, _ = _components((maps >= level) & field, volume)
        mask = labels == labels[peak]
        if best is None or mask.sum() > best[0].sum():
            best = (mask, level)
        if mask.sum() >= min_count:
            best = (mask, level)
            break
    assert best is not None
    return _region(maps, best[0], best[1], spacing, False, volume)
