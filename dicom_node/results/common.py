"""What every result object shares: identity, deterministic UIDs, the IHE AIR algorithm description, findings.

IHE AI Results (AIR) puts each result object type into its own new series of the source study, with a stable Series
Number and Description (``RESULT_SERIES``), and describes the algorithm in the Contributing Equipment Sequence
(0018,A001), PS3.3 C.7.5.1 General Equipment Module / C.12.1 SOP Common Module.

UIDs are derived, not random (PS3.5 B.2, UUID-derived "2.25." UIDs from name-based RFC 4122 version 5 UUIDs), so a
re-delivery of the same result produces byte-for-byte the same instances and the PACS de-duplicates them:

* Series Instance UID = f(source series, detector, model version, object kind, variant)
* SOP Instance UID = f(the series inputs, the sorted source SOP Instance UIDs)

A re-run over a changed instance set (late images) therefore lands in the same result series with a new SOP
Instance UID, and the new SR names the old one in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import __version__
from dicom_node.models import registry as detector_registry
from dicom_node.models.base import ModelIdentity, SeriesResult
from dicom_node.models.regions import RegionRules, polygon_of, select_regions
from dicom_node.models.spec import DetectorSpec, SpecCode

MANUFACTURER = "dicom-node"

# Namespace of all UUID-derived UIDs this software makes (a fixed random UUID; never change it, or re-deliveries
# of old results get new UIDs).
_UID_NAMESPACE = uuid.UUID("6f1f3c1e-8f5e-4d2a-9a57-3b0c5f0f2d11")


@dataclass(frozen=True)
class ResultSeries:
    """Stable Series Number and Description of one result object type (documented in docs/conformance.md)."""

    number: int
    description: str


# Descriptions are plain ASCII so they need no Specific Character Set beyond the default repertoire.
RESULT_SERIES: dict[str, ResultSeries] = {
    "SEG": ResultSeries(9901, "AI anomaly segmentation - not for primary diagnosis"),
    "SR": ResultSeries(9902, "AI anomaly report - not for primary diagnosis"),
    "PM": ResultSeries(9903, "AI anomaly map - not for primary diagnosis"),
    "SC": ResultSeries(9904, "AI key image - NOT FOR DIAGNOSIS"),
}

# Private coding scheme (PS3.16 8.2: designators starting with "99") for concepts no standard terminology has.
# Code values are at most 16 characters (Code Value is SH; longer ones become Long Code Value, which some readers,
# highdicom's srread among them, do not follow). Every object identifies the scheme in its Coding Scheme
# Identification Sequence (CODING_SCHEMES).
CODING_SCHEME = "99DCMNODE"
ANOMALY_SCORE = Code("ANOMALY-SCORE", CODING_SCHEME, "Anomaly score")
ANOMALY_ASSESSMENT = Code("ANOMALY-ASSESS", CODING_SCHEME, "Anomaly assessment")
# A one-class detector says "unlike the normal training images", never what the finding is: the finding is an
# anomaly, not a lesion or any other diagnosis.
ANOMALY = Code("ANOMALY", CODING_SCHEME, "Anomaly")
UNITLESS = Code("1", "UCUM", "no units")
NORMAL: Code = codes.SCT.Normal  # SCT 17621005
ABNORMAL: Code = codes.SCT.Abnormal  # SCT 263654008
# CID 7150 Segmentation Property Categories: the broadest category that fits "unlike the normals".
FINDING_CATEGORY: Code = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
FINDING_TYPE: Code = ANOMALY
VOLUME: Code = Code("118565006", "SCT", "Volume")
CUBIC_MM = Code("mm3", "UCUM", "cubic millimeter")
# IHE AIR: Purpose of Reference of the Contributing Equipment item that describes the algorithm.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

# Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2.1) items of the private schemes the objects use.
CODING_SCHEMES: dict[str, tuple[str, str]] = {
    CODING_SCHEME: ("dicom-node anomaly detection codes", "dicom-node project"),
    "99IHE": ("IHE private codes", "IHE"),
}
# Person Name of the creator of a SEG or Parametric Map (Content Identification Macro, PS3.3 C.10.9): the node.
CONTENT_CREATOR = "dicom-node^AI"
# Recommended Display CIELab Value per segment (PS3.3 C.8.20.2): red, yellow, magenta, then repeating.
SEGMENT_COLOURS: tuple[tuple[float, float, float], ...] = ((53.2, 80.1, 67.2), (97.1, -21.6, 94.5), (60.3, 98.2, -60.8))

# Where the regions lie (the head foreground the brain detector reads, it has no brain mask; the thorax) and the
# procedure reported come from each detector's DetectorSpec (models/brain_mri/, models/chest_xray/, a plugin's),
# through models/registry.py; a detector that states none gets no anatomy and the generic procedure.
GENERIC_PROCEDURE = Code("18748-4", "LN", "Diagnostic imaging study")


def _spec(detector: str) -> DetectorSpec | None:
    try:
        return detector_registry.spec(detector)
    except detector_registry.UnknownDetectorError:
        return None


def _code(code: SpecCode | None) -> Code | None:
    return Code(code.value, code.scheme, code.meaning) if code is not None else None


def anatomy_code(detector: str) -> Code | None:
    """Where the detector's regions lie (SEG Anatomic Region, SR Finding Site); None when not stated."""
    spec = _spec(detector)
    return _code(spec.anatomy) if spec is not None else None


def procedure_code(detector: str) -> Code:
    """The SR's Procedure Reported: the detector's own, else the generic diagnostic imaging study."""
    spec = _spec(detector)
    return (_code(spec.procedure) if spec is not None else None) or GENERIC_PROCEDURE


def derived_uid(*parts: object) -> str:
    """A UUID-derived UID (PS3.5 B.2) that depends only on ``parts``."""
    name = "\x1f".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def device_uid(model: ModelIdentity) -> str:
    """Device UID of the algorithm; it changes whenever the model (weights) change, as IHE AIR asks."""
    return derived_uid("device", model.detector, model.method, model.version, model.weights_sha256)


@dataclass(frozen=True)
class ResultUIDs:
    series_instance_uid: str
    sop_instance_uid: str


def result_uids(
    source_series_uid: str, sop_instance_uids: Iterable[str], model: ModelIdentity, kind: str, variant: str = ""
) -> ResultUIDs:
    """Deterministic Series and SOP Instance UIDs of one result object.

    ``variant`` separates objects of the same kind whose content differs by destination profile (a SEG with and
    one without empty frames must not share a SOP Instance UID)."""
    series = derived_uid("series", source_series_uid, model.detector, model.version, kind, variant)
    instance = derived_uid(series, *sorted(sop_instance_uids))
    return ResultUIDs(series, instance)


def software_versions(model: ModelIdentity) -> tuple[str, str]:
    return (f"dicom-node {__version__}", f"{model.method} {model.version}")


def model_name(model: ModelIdentity) -> str:
    return f"{model.detector} {model.method}"[:64]


class EnhancedEquipment(TypedDict):
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


def enhanced_equipment(model: ModelIdentity) -> EnhancedEquipment:
    """Enhanced General Equipment Module (PS3.3 C.7.5.2) arguments of highdicom's SEG and PM constructors: the
    model stands in for the device, its weights' hash for the serial number (so a result names the exact weights)."""
    return EnhancedEquipment(
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name(model),
        software_versions=software_versions(model)[0],
        device_serial_number=model.weights_sha256[:16] or "unknown",
    )


def algorithm_identification(model: ModelIdentity, pixel_threshold: float) -> hd.AlgorithmIdentificationSequence:
    """Segment algorithm identification (PS3.3 C.8.20.2, family DCM 123110 Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=model_name(model),
        family=codes.DCM.ArtificialIntelligence,
        version=model.version[:64],
        parameters={"pixel_threshold": f"{pixel_threshold:.6g}"},
    )


def processing_algorithm_item(model: ModelIdentity) -> Dataset:
    """IHE AIR Contributing Equipment item (PS3.3 C.12.1.1.9 "Contributing Equipment Sequence")."""
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = model_name(model)
    item.SoftwareVersions = list(software_versions(model))
    item.DeviceUID = device_uid(model)
    item.DeviceSerialNumber = model.weights_sha256[:16] or "unknown"
    return item


def add_processing_algorithm(dataset: Dataset, model: ModelIdentity) -> Dataset:
    """Append the IHE AIR item after the object is built (highdicom accepts only DCM purpose codes there)."""
    existing = list(dataset.get("ContributingEquipmentSequence", []))
    dataset.ContributingEquipmentSequence = DicomSequence([*existing, processing_algorithm_item(model)])
    return dataset


def coding_scheme_identification(dataset: Dataset) -> Dataset:
    """Identify every private coding scheme the object uses (PS3.3 C.12.1.1.2: Coding Scheme Identification
    Sequence, one item per designator; standard schemes are known to readers and need none)."""
    items = []
    for designator, (name, organisation) in CODING_SCHEMES.items():
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = organisation
        items.append(item)
    dataset.CodingSchemeIdentificationSequence = DicomSequence(items)
    return dataset


def finish(dataset: Dataset, kind: str, model: ModelIdentity) -> Dataset:
    """Common last touches: series description, IHE AIR equipment item, coding schemes, content creator."""
    dataset.SeriesDescription = RESULT_SERIES[kind].description
    coding_scheme_identification(dataset)
    if kind in ("SEG", "PM"):
        dataset.ContentCreatorName = CONTENT_CREATOR
    # highdicom takes one Software Versions value; the attribute is multi-valued (node version, model version).
    dataset.SoftwareVersions = list(software_versions(model))
    if kind in ("PM", "SC") and "Laterality" not in dataset:
        # General Series Laterality (PS3.3 C.7.3.1) is Type 2C; these IODs carry no Image/Frame Laterality, so
        # dciodvfy requires the attribute; empty = unknown.
        dataset.Laterality = None
    return add_processing_algorithm(dataset, model)


def projection_geometry(dataset: Dataset, source: Dataset) -> Dataset:
    """Multi-frame objects over a radiograph (no Frame of Reference): the General Image Patient Orientation is
    then Type 2C (PS3.3 C.7.6.1) and comes from the source; a Pixel Spacing of zero copied from the source
    (it means "unknown") is dropped rather than sent as an invalid value."""
    if "FrameOfReferenceUID" in dataset:
        return dataset
    if "PatientOrientation" not in dataset:
        orientation = source.get("PatientOrientation")
        if orientation:
            dataset.PatientOrientation = list(orientation)
        else:
            dataset.add_new(0x00200020, "CS", None)
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures and any(float(v) <= 0 for v in measures[0].get("PixelSpacing", [1, 1])):
            del measures[0].PixelSpacing
            if len(measures[0]) == 0:
                del shared[0].PixelMeasuresSequence
    return dataset


@dataclass(frozen=True)
class SourceSeries:
    """The source instances and the detector's maps, both in spatial order (slice position along the normal).

    ``datasets[i]`` is the instance that ``maps[i]`` and ``image_scores[i]`` belong to."""

    datasets: list[Dataset]
    maps: np.ndarray  # (n, rows, cols) float32
    image_scores: np.ndarray  # (n,)

    @property
    def is_volume(self) -> bool:
        return len(self.datasets) > 1

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def _slice_position(dataset: Dataset) -> float:
    orientation = dataset.get("ImageOrientationPatient")
    position = dataset.get("ImagePositionPatient")
    if orientation is None or position is None:
        return float(dataset.get("InstanceNumber") or 0)
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return float(np.dot(np.cross(row, col), np.asarray(position, float)))


def align(datasets: Sequence[Dataset], result: SeriesResult) -> SourceSeries:
    """Pair each map of ``result`` with its source dataset and sort both spatially.

    Raises ValueError when a map has no source instance or the geometry differs (a broken hand-over)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    missing = [uid for uid in result.sop_instance_uids if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} scored instance(s) not among the source datasets, e.g. {missing[0]}")
    maps = np.asarray(result.anomaly_maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != len(result.sop_instance_uids):
        raise ValueError(f"anomaly maps have shape {maps.shape}, expected ({len(result.sop_instance_uids)}, R, C)")
    ordered = sorted(
        range(len(result.sop_instance_uids)), key=lambda i: _slice_position(by_uid[result.sop_instance_uids[i]])
    )
    sources = [by_uid[result.sop_instance_uids[i]] for i in ordered]
    for ds, index in zip(sources, ordered, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != maps.shape[1:]:
            raise ValueError(
                f"map {index} is {maps.shape[1:]} but instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}"
            )
    scores = np.asarray(result.image_scores, dtype=np.float64)
    return SourceSeries(sources, maps[ordered], scores[ordered] if scores.size else np.zeros(len(ordered)))


@dataclass(frozen=True)
class Finding:
    """One region of an Abnormal result; ``number`` is its segment number (1-based, strongest evidence first).

    ``above_threshold`` is False for the region cut below the pixel threshold around the evidence of an Abnormal
    score that no pixel above the threshold explains (models.regions.select_regions)."""

    number: int
    tracking_uid: str
    size: int  # pixels (2-D) or voxels (3-D)
    max_score: float
    mean_score: float
    evidence: float  # sum of the map above the level the region was cut at: what ranks the regions
    size_mm: float  # equivalent diameter
    extent: float  # mm² (one image) or mm³ (a volume)
    above_threshold: bool
    frames: tuple[int, ...]  # indices into SourceSeries.datasets that the region touches
    bbox: tuple[int, int, int, int]  # row_min, col_min, row_max, col_max (inclusive) over all its frames
    peak_frame: int  # frame with the highest score inside the region
    outline: np.ndarray  # closed polygon (k, 2) of the region on its peak frame, (column, row) in DICOM image
    # coordinates: (0, 0) is the top left corner of the top left pixel (PS3.3 C.18.6.1.1)

    @property
    def label(self) -> str:
        return f"Anomaly {self.number}"


@dataclass(frozen=True)
class Findings:
    labels: np.ndarray  # (n, rows, cols) uint8, 0 = background, k = Finding k
    findings: list[Finding]


def _positive_pair(value: object) -> tuple[float, float] | None:
    try:
        pair = (float(value[0]), float(value[1]))  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return None
    return pair if pair[0] > 0 and pair[1] > 0 else None


# A radiograph that states no pixel spacing: assume its long side spans a 43 cm detector.
ASSUMED_DETECTOR_MM = 430.0


def source_spacing(source: SourceSeries) -> tuple[float, float, float]:
    """(slice, row, column) spacing in mm: Pixel Spacing (or Imager Pixel Spacing), slice distance from the
    positions (Spacing Between Slices, Slice Thickness, 1 mm as fallbacks)."""
    first = source.datasets[0]
    pair = _positive_pair(first.get("PixelSpacing")) or _positive_pair(first.get("ImagerPixelSpacing"))
    if pair is None:
        side = ASSUMED_DETECTOR_MM / max(int(first.Rows), int(first.Columns))
        pair = (side, side)
    dz = 1.0
    if source.is_volume:
        positions = np.array([_slice_position(ds) for ds in source.datasets])
        steps = np.abs(np.diff(positions))
        steps = steps[steps > 1e-6]
        if steps.size:
            dz = float(np.median(steps))
        else:
            dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0) or 1.0
    return dz, pair[0], pair[1]


def superior_coordinates(source: SourceSeries) -> np.ndarray | None:
    """The patient's head-ward (+Z, PS3.3 C.7.6.2.1.1) coordinate in mm of every pixel of a volume, from Image
    Position and Orientation (Patient) and Pixel Spacing; None for a single image or without that geometry."""
    if not source.is_volume:
        return None
    first = source.datasets[0]
    orientation, spacing = first.get("ImageOrientationPatient"), _positive_pair(first.get("PixelSpacing"))
    if orientation is None or spacing is None or any("ImagePositionPatient" not in ds for ds in source.datasets):
        return None
    row_cosine_z, column_cosine_z = float(orientation[2]), float(orientation[5])
    origin_z = np.array([float(ds.ImagePositionPatient[2]) for ds in source.datasets], dtype=np.float32)
    _, rows, columns = source.maps.shape
    # Pixel (r, c): position + c * column spacing * row direction + r * row spacing * column direction.
    along_columns = np.arange(columns, dtype=np.float32) * spacing[1] * row_cosine_z
    along_rows = np.arange(rows, dtype=np.float32) * spacing[0] * column_cosine_z
    return origin_z[:, None, None] + along_rows[None, :, None] + along_columns[None, None, :]


def find_findings(
    source: SourceSeries,
    pixel_threshold: float,
    tracking_seed: str,
    *,
    abnormal: bool,
    rules: RegionRules | None = None,
) -> Findings:
    """The regions of the result by the shared rules (models.regions.select_regions): none when ``abnormal`` is
    False; otherwise at least one, inside the detector's field, at least ``rules.min_size_mm`` across, strongest
    evidence first, at most ``rules.max_regions``. Tracking UIDs are deterministic from ``tracking_seed`` and the
    number."""
    maps = source.maps
    chosen = select_regions(
        maps,
        pixel_threshold,
        source_spacing(source),
        abnormal=abnormal,
        rules=rules,
        superior=superior_coordinates(source) if abnormal else None,
    )
    labels = np.zeros(maps.shape, dtype=np.uint8)
    findings: list[Finding] = []
    for number, region in enumerate(chosen, start=1):
        mask = region.mask
        labels[mask & (labels == 0)] = number
        frames = np.nonzero(mask.any(axis=(1, 2)))[0]
        rows = np.nonzero(mask.any(axis=(0, 2)))[0]
        cols = np.nonzero(mask.any(axis=(0, 1)))[0]
        peak_frame = region.peak[0]
        outline = polygon_of(mask[peak_frame]) + 0.5
        values = maps[mask]
        findings.append(
            Finding(
                number=number,
                tracking_uid=derived_uid("finding", tracking_seed, number),
                size=int(mask.sum()),
                max_score=region.score,
                mean_score=float(values.mean()),
                evidence=region.evidence,
                size_mm=region.size_mm,
                extent=region.extent,
                above_threshold=region.above_threshold,
                frames=tuple(int(f) for f in frames),
                bbox=(int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])),
                peak_frame=peak_frame,
                outline=outline.astype(np.float32),
            )
        )
    return Findings(labels, findings)


def read_sources(paths: Iterable[str], *, pixels: bool = False) -> list[Dataset]:
    """Read source instances; headers only unless pixel data are needed (Secondary Capture)."""
    return [pydicom.dcmread(path, stop_before_pixels=not pixels) for path in paths]
