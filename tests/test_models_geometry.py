"""Slice sorting, plane detection and the axial reformat round trip on synthetic series with real geometry."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest

from dicom_node.models.geometry import axial_reformat, plane_of, sort_slices

# (row cosines, column cosines) of the three standard planes (PS3.3 C.7.6.2.1.1, LPS patient axes).
PLANES = {
    "axial": ([1, 0, 0], [0, 1, 0]),
    "sagittal": ([0, 1, 0], [0, 0, -1]),
    "coronal": ([1, 0, 0], [0, 0, -1]),
}


def make_series(plane: str, count: int = 5, rows: int = 6, cols: int = 7) -> list[pydicom.Dataset]:
    row, col = (np.array(v, dtype=float) for v in PLANES[plane])
    normal = np.cross(row, col)
    series = []
    for k in range(count):
        ds = pydicom.Dataset()
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = list(normal * 2.0 * k + np.array([-10.0, -20.0, 30.0]))
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = rows, cols
        ds.InstanceNumber = count - k  # deliberately reversed: position must win
        ds.SOPInstanceUID = f"1.2.3.{k}"
        series.append(ds)
    return series


def patient_position(ds: pydicom.Dataset, r: int, c: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1: P = S + c * Δc * row cosines + r * Δr * column cosines."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    spacing = [float(v) for v in ds.PixelSpacing]
    return np.array(ds.ImagePositionPatient, dtype=float) + c * spacing[1] * iop[:3] + r * spacing[0] * iop[3:]


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_plane_and_sort(plane: str) -> None:
    series = make_series(plane)
    shuffled = series[:]
    random.Random(1).shuffle(shuffled)
    order = sort_slices(shuffled)
    assert [shuffled[i].SOPInstanceUID for i in order] == [ds.SOPInstanceUID for ds in series]
    assert plane_of(series[0]) == plane


def test_sort_falls_back_to_instance_number() -> None:
    series = make_series("axial")
    for ds in series:
        del ds.ImagePositionPatient
    order = sort_slices(series)
    assert [series[i].InstanceNumber for i in order] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_reformat_puts_voxels_in_patient_order_and_round_trips(plane: str) -> None:
    series = make_series(plane)
    reformat = axial_reformat(series)
    assert reformat is not None
    volume = np.random.default_rng(0).random((len(series), series[0].Rows, series[0].Columns))
    axial = reformat.forward(volume)
    # Every voxel lands where its patient coordinates say: axis 0 ascending z, 1 ascending y, 2 ascending x.
    coords = np.zeros((*volume.shape, 3))
    for k, ds in enumerate(series):
        for r in range(ds.Rows):
            for c in range(ds.Columns):
                coords[k, r, c] = patient_position(ds, r, c)
    moved = reformat.forward(coords[..., 2]), reformat.forward(coords[..., 1]), reformat.forward(coords[..., 0])
    for axis, values in enumerate(moved):
        steps = np.diff(values, axis=axis)
        assert (steps > 0).all(), f"target axis {axis} not ascending for {plane}"
    np.testing.assert_array_equal(reformat.inverse(axial), volume)
    if plane == "axial":
        assert reformat.is_identity
