"""Pixel data to float images in [0, 1]: DICOM (PS3.3 C.7.6.3, C.11) and PNG/JPG files, plus image helpers.

DICOM pixel data goes through the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, PS3.3 C.11.1),
then the VOI LUT or window (PS3.3 C.11.2) when the file has one, else a robust min-max; MONOCHROME1 is inverted so
that higher values are always brighter (PS3.3 C.7.6.3.1.2). Compressed transfer syntaxes are decoded by pydicom's
pixel data handlers (pylibjpeg, openjpeg, RLE, JPEG-LS plug-ins).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from scipy import ndimage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", "")


class PreprocessingError(ValueError):
    """Pixel data that cannot be turned into a grey-scale image; the message says why."""


def _robust_unit(values: np.ndarray, low_pct: float = 0.0, high_pct: float = 100.0) -> np.ndarray:
    """Scale to [0, 1] between two percentiles (min-max by default); a constant image becomes zeros."""
    values = values.astype(np.float32, copy=False)
    lo, hi = (
        np.percentile(values, [low_pct, high_pct])
        if (low_pct, high_pct) != (0.0, 100.0)
        else (
            float(values.min()),
            float(values.max()),
        )
    )
    if not np.isfinite(hi - lo) or hi - lo <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _has_voi(ds: pydicom.Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def dicom_frames(ds: pydicom.Dataset, use_voi: bool = True) -> np.ndarray:
    """All frames of a grey-scale DICOM image as float32 (frames, rows, cols) in [0, 1], brighter = higher.

    ``use_voi`` False ignores stored windows and scales the modality values min-max (MR windows are often set for
    display of one slice and would clip others)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessingError("the dataset has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoders raise many types; the caller needs one clear error
        raise PreprocessingError(
            f"cannot decode pixel data ({ds.file_meta.TransferSyntaxUID if 'file_meta' in ds else '?'}): {err}"
        ) from err
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if samples != 1:
        if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
            raise PreprocessingError(f"unsupported photometric interpretation {photometric}")
        # pydicom converts YBR to RGB by default; grey stored as colour: average the channels.
        grey = pixels.astype(np.float32).mean(axis=-1)
        grey = grey.reshape((frames, *grey.shape[-2:]))
        return np.stack([_robust_unit(f) for f in grey])
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    values = values.reshape((frames, *values.shape[-2:]))
    out = []
    for index, frame in enumerate(values):
        if use_voi and _has_voi(ds):
            # A VOI LUT Sequence indexes a table with the (integer) modality values; windows take floats.
            lut_input = np.rint(frame).astype(np.int64) if "VOILUTSequence" in ds else frame
            windowed = apply_voi_lut(lut_input, ds, index=0).astype(np.float32)
            unit = _robust_unit(windowed)
        else:
            unit = _robust_unit(frame)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        out.append(unit)
        del index
    return np.stack(out).astype(np.float32)


def modality_values(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame's stored values through the Modality LUT (PS3.3 C.11.1), float32, MONOCHROME1 negated so that
    higher is brighter; no windowing (for volumes normalised as a whole)."""
    if "PixelData" not in ds:
        raise PreprocessingError("the dataset has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return dicom_image(ds)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoders raise many types; the caller needs one clear error
        raise PreprocessingError(f"cannot decode pixel data: {err}") from err
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if values.ndim == 3:
        values = values[0]
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        values = -values
    return values


def dicom_image(ds: pydicom.Dataset, use_voi: bool = True) -> np.ndarray:
    """The first (usually only) frame of a DICOM image as float32 (rows, cols) in [0, 1]."""
    return dicom_frames(ds, use_voi=use_voi)[0]


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM preamble magic ``DICM`` at offset 128 (PS3.10 7.1)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def load_image_file(path: Path, use_voi: bool = True) -> np.ndarray:
    """A PNG/JPG (grey, grey stored as RGB, 8 or 16 bit) or DICOM file as float32 (rows, cols) in [0, 1]."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES or is_dicom_file(path):
        if is_dicom_file(path) or path.suffix.lower() in (".dcm", ".dicom"):
            return dicom_image(pydicom.dcmread(path), use_voi=use_voi)
        raise PreprocessingError(f"{path.name}: not a PNG/JPG/DICOM file")
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            return _robust_unit(arr)
        if img.mode == "F":
            return _robust_unit(np.asarray(img, dtype=np.float32))
        if img.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
            arr = np.asarray(img.convert("RGB"), dtype=np.float32).mean(axis=-1)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32)
    return arr / 255.0


def list_image_files(directory: Path) -> list[Path]:
    """Image and DICOM files directly in ``directory`` (sorted; hidden files skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PreprocessingError(f"{directory} is not a directory")
    files = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(path):
            files.append(path)
    return files


def resize(image: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize a 2-D float image to ``shape`` (rows, cols); bilinear by default, nearest with ``order=0``."""
    if image.shape == tuple(shape):
        return image.astype(np.float32, copy=False)
    resample = Image.Resampling.BILINEAR if order == 1 else Image.Resampling.NEAREST
    pil = Image.fromarray(image.astype(np.float32), mode="F")
    return np.asarray(pil.resize((int(shape[1]), int(shape[0])), resample=resample), dtype=np.float32)


def foreground_mask(image: np.ndarray, fraction: float = 0.08, work_size: int = 128) -> np.ndarray:
    """The body (head) in a [0, 1] image: smoothed intensity above ``fraction`` of its 99th percentile, holes filled,
    largest connected part kept. Background noise and labels outside the head fall away. Computed on a copy at most
    ``work_size`` pixels across (speed) and resized back."""
    rows, cols = image.shape
    scale = min(1.0, work_size / max(rows, cols))
    small = resize(image, (max(1, round(rows * scale)), max(1, round(cols * scale)))) if scale < 1 else image
    smooth = ndimage.uniform_filter(small.astype(np.float32), size=3)
    level = float(np.percentile(smooth, 99.0))
    if level <= 0:
        return np.zeros(image.shape, dtype=bool)
    mask = ndimage.binary_opening(smooth > fraction * level, iterations=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    mask = np.asarray(ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1)), dtype=bool)
    if mask.shape != image.shape:
        mask = resize(mask.astype(np.float32), image.shape) > 0.5
    return mask


def foreground_fraction(image: np.ndarray, fraction: float = 0.08) -> float:
    """Cheap share of pixels brighter than ``fraction`` of the 99th percentile (no morphology), on a 4x subsample."""
    small = image[::4, ::4] if min(image.shape) >= 32 else image
    level = float(np.percentile(small, 99.0))
    if level <= 0:
        return 0.0
    return float((small > fraction * level).mean())


@dataclass(frozen=True)
class CropBox:
    """Where the square model input came from in the source image: ``[top:top+size, left:left+size]`` (may reach
    outside the image; outside counts as zero)."""

    top: int
    left: int
    size: int
    source_shape: tuple[int, int]


def square_crop_box(mask: np.ndarray, margin: float = 0.06) -> CropBox:
    """The smallest square around the mask (plus a relative margin); the whole image when the mask is empty."""
    rows, cols = mask.shape
    if not mask.any():
        size = max(rows, cols)
        return CropBox(top=(rows - size) // 2, left=(cols - size) // 2, size=size, source_shape=(rows, cols))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    size = int(round(max(y1 - y0, x1 - x0) * (1.0 + 2 * margin)))
    size = max(size, 8)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return CropBox(top=cy - size // 2, left=cx - size // 2, size=size, source_shape=(rows, cols))


def crop_square(image: np.ndarray, box: CropBox) -> np.ndarray:
    """Cut ``box`` out of ``image``, padding with zeros where the box leaves the image."""
    out = np.zeros((box.size, box.size), dtype=np.float32)
    rows, cols = image.shape
    y0, x0 = max(box.top, 0), max(box.left, 0)
    y1, x1 = min(box.top + box.size, rows), min(box.left + box.size, cols)
    if y1 > y0 and x1 > x0:
        out[y0 - box.top : y1 - box.top, x0 - box.left : x1 - box.left] = image[y0:y1, x0:x1]
    return out


def uncrop_square(patch: np.ndarray, box: CropBox, fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_square` for a map of any resolution: resize to the box and paste into the source."""
    full = np.full(box.source_shape, fill, dtype=np.float32)
    scaled = resize(patch, (box.size, box.size))
    rows, cols = box.source_shape
    y0, x0 = max(box.top, 0), max(box.left, 0)
    y1, x1 = min(box.top + box.size, rows), min(box.left + box.size, cols)
    if y1 > y0 and x1 > x0:
        full[y0:y1, x0:x1] = scaled[y0 - box.top : y1 - box.top, x0 - box.left : x1 - box.left]
    return full


def normalise_foreground(image: np.ndarray, mask: np.ndarray, high_pct: float = 99.5) -> np.ndarray:
    """Per-image intensity normalisation: the foreground's ``high_pct`` percentile becomes 1 (sequences and scanners
    differ in scale); background set to 0."""
    if not mask.any():
        return np.zeros_like(image, dtype=np.float32)
    hi = float(np.percentile(image[mask], high_pct))
    if hi <= 0:
        return np.zeros_like(image, dtype=np.float32)
    out = np.clip(image / hi, 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out


def to_rgb_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack equal-size grey [0, 1] images as (n, 3, rows, cols) float32 (grey repeated in R, G, B)."""
    stack = np.stack([np.asarray(img, dtype=np.float32) for img in images])
    return np.repeat(stack[:, None], 3, axis=1)
