"""Slice order and orientation of a DICOM series (PS3.3 C.7.6.2 Image Plane Module), reformatting to axial.

The Image Orientation (Patient) row and column cosines and Image Position (Patient) place each slice in the
patient coordinate system (LPS: +x to the patient's left, +y posterior, +z head). Slices are sorted along the slice
normal (row x column); a volume whose slices are sagittal or coronal is permuted and flipped so that its axes run
along +z, +y, +x, whose first index then gives axial slices (rows posterior-ward, columns toward the patient's left:
the usual radiological display). :class:`Reformat` inverts exactly, so maps go back to each source slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom

Plane = Literal["axial", "coronal", "sagittal", "oblique", "unknown"]


def orientation_cosines(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(row cosines, column cosines) from Image Orientation (Patient), or None when absent or degenerate."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    row, col = values[:3], values[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def slice_normal(ds: pydicom.Dataset) -> np.ndarray | None:
    cosines = orientation_cosines(ds)
    if cosines is None:
        return None
    normal = np.cross(cosines[0], cosines[1])
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-6 else None


def plane_of(ds: pydicom.Dataset, oblique_tolerance: float = 0.8) -> Plane:
    """Acquisition plane from the slice normal's dominant patient axis (x: sagittal, y: coronal, z: axial)."""
    normal = slice_normal(ds)
    if normal is None:
        return "unknown"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < oblique_tolerance:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def sort_slices(datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """Indices of ``datasets`` in slice order: by Image Position (Patient) projected on the slice normal when every
    slice has position and the same orientation, else by Instance Number, else as given."""
    count = len(datasets)
    normals = [slice_normal(ds) for ds in datasets]
    positions = [ds.get("ImagePositionPatient") for ds in datasets]
    if count and all(n is not None for n in normals) and all(p is not None and len(p) == 3 for p in positions):
        reference = normals[0]
        assert reference is not None
        if all(float(np.dot(n, reference)) > 0.999 for n in normals if n is not None):
            distances = [float(np.dot(np.asarray([float(v) for v in p]), reference)) for p in positions if p]
            return sorted(range(count), key=lambda i: (distances[i], i))

    def instance_number(i: int) -> tuple[int, int]:
        value = datasets[i].get("InstanceNumber")
        return (int(value) if value is not None else 0, i)

    return sorted(range(count), key=instance_number)


@dataclass(frozen=True)
class Reformat:
    """A permutation plus flips that turn a (slices, rows, cols) volume into (z, y, x) order, and back.

    ``axes[k]`` is the source axis that becomes target axis k; ``flips[k]`` whether target axis k is reversed."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]  # target (z, y, x) voxel spacing in mm

    def forward(self, volume: np.ndarray) -> np.ndarray:
        out = np.transpose(volume, self.axes)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=axis)
        return np.ascontiguousarray(out)

    def inverse(self, volume: np.ndarray) -> np.ndarray:
        out = volume
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=axis)
        inverse_axes = tuple(int(i) for i in np.argsort(self.axes))
        return np.ascontiguousarray(np.transpose(out, inverse_axes))

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)


def _slice_spacing(sorted_datasets: Sequence[pydicom.Dataset], normal: np.ndarray) -> float:
    if len(sorted_datasets) >= 2:
        positions = np.asarray(
            [[float(v) for v in ds.ImagePositionPatient] for ds in sorted_datasets], dtype=np.float64
        )
        steps = np.diff(positions @ normal)
        steps = steps[np.abs(steps) > 1e-6]
        if steps.size:
            return float(np.median(np.abs(steps)))
    thickness = sorted_datasets[0].get("SpacingBetweenSlices") or sorted_datasets[0].get("SliceThickness")
    return float(thickness) if thickness else 1.0


def axial_reformat(sorted_datasets: Sequence[pydicom.Dataset]) -> Reformat | None:
    """The reformat of a sorted single-orientation series to axial order, or None when geometry is missing."""
    first = sorted_datasets[0]
    cosines = orientation_cosines(first)
    normal = slice_normal(first)
    if cosines is None or normal is None or "ImagePositionPatient" not in first:
        return None
    row_cos, col_cos = cosines
    # Source volume axes: 0 along the slice normal (sorted ascending), 1 along the column cosines (down the rows),
    # 2 along the row cosines (across the columns).
    directions = [normal, col_cos, row_cos]
    pixel_spacing = first.get("PixelSpacing") or [1.0, 1.0]
    spacings = [_slice_spacing(sorted_datasets, normal), float(pixel_spacing[0]), float(pixel_spacing[1])]
    dominant = [int(np.argmax(np.abs(d))) for d in directions]
    if sorted(dominant) != [0, 1, 2]:
        return None  # strongly oblique: no clean permutation
    axes: list[int] = [0, 0, 0]
    flips: list[bool] = [False, False, False]
    target_spacing: list[float] = [1.0, 1.0, 1.0]
    # Target axis 0 = patient z, 1 = patient y, 2 = patient x.
    for source_axis, (direction, patient_axis) in enumerate(zip(directions, dominant, strict=True)):
        target_axis = 2 - patient_axis
        axes[target_axis] = source_axis
        flips[target_axis] = bool(direction[patient_axis] < 0)
        target_spacing[target_axis] = spacings[source_axis]
    return Reformat(
        axes=(axes[0], axes[1], axes[2]),
        flips=(flips[0], flips[1], flips[2]),
        spacing=(target_spacing[0], target_spacing[1], target_spacing[2]),
    )
