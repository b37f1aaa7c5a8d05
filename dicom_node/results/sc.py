"""Secondary Capture Image IOD (PS3.3 A.8.1): a key image for viewers that cannot show SEG.

The source image, windowed (its own VOI window when it has one, else the 1st-99th percentile) and made
MONOCHROME2, with the anomaly map blended in red-to-yellow where it is above the calibrated pixel threshold, and
"NOT FOR DIAGNOSIS" burned in. 8-bit RGB, Conversion Type WSD (workstation), Burned In Annotation YES. The image is
scaled to at most 1024 pixels on its long side (at least 512 on its short side) so the text is readable and the
object stays small; it is a pointer for the reader, not a diagnostic image.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_node.models.base import ModelIdentity
from dicom_node.results.common import MANUFACTURER, RESULT_SERIES, finish, result_uids

WARNING_TEXT = "NOT FOR DIAGNOSIS"
MAX_SIDE = 1024
MIN_SIDE = 512
BLEND = 0.5  # opacity of the heat map at the map's maximum


def windowed(image: Dataset) -> np.ndarray:
    """The stored pixels as display values 0..255, MONOCHROME2 (bright = dense tissue on a radiograph)."""
    pixels = image.pixel_array
    values = apply_modality_lut(pixels, image)
    if "WindowCenter" in image and "WindowWidth" in image:
        values = apply_voi_lut(values, image, index=0)
        low, high = float(np.min(values)), float(np.max(values))
    else:
        low, high = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    scaled = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-9), 0.0, 1.0)
    if image.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return (scaled * 255.0).astype(np.uint8)


def _heat(anomaly_map: np.ndarray, pixel_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """RGB colours (red at the threshold → yellow at the maximum) and opacity per pixel."""
    peak = float(anomaly_map.max())
    strength = np.clip((anomaly_map - pixel_threshold) / max(peak - pixel_threshold, 1e-9), 0.0, 1.0)
    strength[anomaly_map < pixel_threshold] = 0.0
    colour = np.zeros((*anomaly_map.shape, 3), dtype=np.float32)
    colour[..., 0] = 255.0
    colour[..., 1] = 255.0 * strength
    alpha = np.where(anomaly_map >= pixel_threshold, 0.25 + (BLEND - 0.25) * strength, 0.0).astype(np.float32)
    return colour, alpha


def _target_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height): long side at most MAX_SIDE; small images enlarged towards MIN_SIDE within that limit."""
    scale = min(MAX_SIDE / max(rows, columns), max(1.0, MIN_SIDE / min(rows, columns)))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


def _burn_in(picture: Image.Image) -> None:
    draw = ImageDraw.Draw(picture)
    size = max(12, picture.width // 18)
    font = ImageFont.load_default(size=size)
    margin = max(4, size // 3)
    draw.text(
        (margin, margin),
        WARNING_TEXT,
        fill=(255, 255, 255),
        font=font,
        stroke_width=max(1, size // 12),
        stroke_fill=(0, 0, 0),
    )


def render(image: Dataset, anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The key image as (rows, columns, 3) uint8."""
    grey = windowed(image).astype(np.float32)
    colour, alpha = _heat(np.asarray(anomaly_map, dtype=np.float32), pixel_threshold)
    rgb = grey[..., np.newaxis] * (1.0 - alpha[..., np.newaxis]) + colour * alpha[..., np.newaxis]
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    size = _target_size(picture.height, picture.width)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    _burn_in(picture)
    return np.asarray(picture, dtype=np.uint8)


def _orientation(image: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the rows and columns (PS3.3 C.7.6.1.1.1) from the image's own attributes."""
    given = image.get("PatientOrientation")
    if given and len(given) == 2 and all(str(value)[:1] in "APRLHF" and str(value) for value in given):
        # highdicom takes single letters; an oblique "LP" keeps its dominant first letter.
        return str(given[0])[0], str(given[1])[0]
    cosines = image.get("ImageOrientationPatient")
    if cosines is None:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][1] if vector[axis] > 0 else letters[axis][0]

    return letter(np.asarray(cosines[:3], float)), letter(np.asarray(cosines[3:], float))


def build_sc(
    image: Dataset,
    anomaly_map: np.ndarray,
    model: ModelIdentity,
    pixel_threshold: float,
    source_series_uid: str,
    source_sop_instance_uids: list[str],
) -> Dataset:
    """The key image of ``image`` (with pixel data) and its map; UIDs follow the whole analysed instance set."""
    uids = result_uids(source_series_uid, source_sop_instance_uids, model, "SC")
    pixels = render(image, anomaly_map, pixel_threshold)
    orientation = _orientation(image)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=image,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series_instance_uid,
        series_number=RESULT_SERIES["SC"].number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation is None:
        # highdicom insists on an orientation; unknown is an empty Patient Orientation (Type 2C), not a guess.
        del sc.PatientOrientation
        sc.add_new(0x00200020, "CS", None)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{WARNING_TEXT}: anomaly map of {image.SOPInstanceUID}"[:10240]
    # Reference the source image (PS3.3 C.7.6.1.1.3 Source Image Sequence) so viewers can jump to it.
    source = Dataset()
    source.ReferencedSOPClassUID = image.SOPClassUID
    source.ReferencedSOPInstanceUID = image.SOPInstanceUID
    sc.SourceImageSequence = [source]
    sc.DerivationDescription = "Anomaly map blended over the source image; warning text burned in"
    return finish(sc, "SC", model)
