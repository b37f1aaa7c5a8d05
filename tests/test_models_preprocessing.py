"""Pixel data to images: Modality LUT, VOI LUT/window, MONOCHROME1, 16-bit, compressed syntaxes, PNG/JPG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.models.preprocessing import (
    CropBox,
    crop_square,
    dicom_image,
    foreground_mask,
    load_image_file,
    modality_values,
    square_crop_box,
    uncrop_square,
)


def make_dataset(pixels: np.ndarray, **attrs: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_monochrome1_is_inverted() -> None:
    ramp = np.tile(np.arange(0, 4000, 1000, dtype=np.uint16), (4, 1))
    mono2 = dicom_image(make_dataset(ramp))
    mono1 = dicom_image(make_dataset(ramp, PhotometricInterpretation="MONOCHROME1"))
    assert mono2[0, 0] == 0.0 and mono2[0, -1] == 1.0
    np.testing.assert_allclose(mono1, 1.0 - mono2)


def test_window_and_rescale_are_applied() -> None:
    # Stored 0..3000, rescale slope 2 intercept -1000 -> -1000..5000; window 1000 +- 500 clips below 500 / above 1500.
    stored = np.array([[0, 750, 1000, 1250, 3000]], dtype=np.uint16)
    ds = make_dataset(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1000)
    np.testing.assert_allclose(modality_values(ds), [[-1000, 500, 1000, 1500, 5000]])
    image = dicom_image(ds)
    assert image[0, 0] == pytest.approx(0.0)  # below the window
    assert image[0, -1] == pytest.approx(1.0)  # above the window
    assert image[0, 2] == pytest.approx(0.5, abs=0.01)  # window centre
    # Without VOI: min-max of the modality values.
    assert dicom_image(ds, use_voi=False)[0, 2] == pytest.approx(2000 / 6000, abs=1e-3)


def test_voi_lut_sequence_is_applied() -> None:
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = make_dataset(stored)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [0, 100, 50, 10]  # non-monotonic: proves the table, not a window, was used
    ds.VOILUTSequence = [item]
    ds["LUTData"] = item["LUTData"]  # keep pydicom happy on some versions
    del ds.LUTData
    image = dicom_image(ds)
    np.testing.assert_allclose(image[0], [0.0, 1.0, 0.5, 0.1])


def test_signed_16_bit() -> None:
    pixels = np.array([[-2000, 0, 2000]], dtype=np.int16)
    np.testing.assert_allclose(dicom_image(make_dataset(pixels)), [[0.0, 0.5, 1.0]])


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_syntaxes_decode_like_uncompressed(name: str) -> None:
    reference = dicom_image(pydicom.dcmread(get_testdata_file("MR_small.dcm")), use_voi=False)
    compressed = dicom_image(pydicom.dcmread(get_testdata_file(name)), use_voi=False)
    np.testing.assert_allclose(compressed, reference, atol=1e-6)


def test_png_grey_as_rgb_and_16_bit(tmp_path: Path) -> None:
    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB").save(tmp_path / "rgb.png")
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.jpg", quality=100)
    Image.fromarray(np.array([[0, 1000, 4000]], dtype=np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_allclose(load_image_file(tmp_path / "rgb.png"), grey / 255.0)
    np.testing.assert_allclose(load_image_file(tmp_path / "grey.jpg"), grey / 255.0, atol=0.02)
    np.testing.assert_allclose(load_image_file(tmp_path / "deep.png"), [[0.0, 0.25, 1.0]])


def test_dicom_file_without_suffix(tmp_path: Path) -> None:
    ds = make_dataset(np.array([[0, 10]], dtype=np.uint16))
    path = tmp_path / "IM0001"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(load_image_file(path), [[0.0, 1.0]])


def test_crop_round_trip_and_foreground() -> None:
    image = np.zeros((60, 100), dtype=np.float32)
    image[10:50, 30:70] = 1.0  # the "head"
    mask = foreground_mask(image)
    assert mask[30, 50] and not mask[5, 5]
    box = square_crop_box(image > 0.5, margin=0.0)
    assert box.size == 40 and (box.top, box.left) == (10, 30)
    square = crop_square(image, box)
    assert square.shape == (40, 40) and square.min() == 1.0
    back = uncrop_square(square, box)
    np.testing.assert_allclose(back, image)
    # A box leaving the image pads with zeros and maps back without error.
    outside = CropBox(top=-10, left=-10, size=30, source_shape=(20, 20))
    patch = crop_square(np.ones((20, 20), dtype=np.float32), outside)
    assert patch[0, 0] == 0.0 and patch[15, 15] == 1.0
    np.testing.assert_allclose(uncrop_square(patch, outside), np.ones((20, 20)))
