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
from scipy import ndimage

from dicom_node import __version__
from models.base import ModelIdentity, SeriesResult

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
CODING_SCHEME = "99DCMNODE"
ANOMALY_SCORE = Code("ANOMALY-SCORE", CODING_SCHEME, "Anomaly score")
ANOMALY_ASSESSMENT = Code("ANOMALY-ASSESSMENT", CODING_SCHEME, "Anomaly assessment")
UNITLESS = Code("1", "UCUM", "no units")
NORMAL: Code = codes.SCT.Normal  # SCT 17621005
ABNORMAL: Code = codes.SCT.Abnormal  # SCT 263654008
# CID 7150 / CID 7151: a one-class detector says "not like the normals", not what the finding is.
FINDING_CATEGORY: Code = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
FINDING_TYPE: Code = codes.SCT.Lesion  # SCT 52988006
# IHE AIR: Purpose of Reference of the Contributing Equipment item that describes the algorithm.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

ANATOMY: dict[str, Code] = {"brain_mri": codes.SCT.Brain, "chest_xray": Code("51185008", "SCT", "Thorax")}
PROCEDURE: dict[str, Code] = {
    "brain_mri": Code("24590-2", "LN", "MR Brain"),
    "chest_xray": Code("36554-4", "LN", "XR Chest Single view"),
}
GENERIC_PROCEDURE = Code("18748-4", "LN", "Diagnostic imaging study")


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


def finish(dataset: Dataset, kind: str, model: ModelIdentity) -> Dataset:
    """Common last touches: series description, IHE AIR equipment item."""
    dataset.SeriesDescription = RESULT_SERIES[kind].description
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
    """One connected region above the pixel threshold; ``number`` is its segment number (1-based)."""

    number: int
    tracking_uid: str
    size: int  # pixels (2-D) or voxels (3-D)
    max_score: float
    mean_score: float
    frames: tuple[int, ...]  # indices into SourceSeries.datasets that the region touches
    bbox: tuple[int, int, int, int]  # row_min, col_min, row_max, col_max (inclusive) over all its frames
    peak_frame: int  # frame with the highest score inside the region

    @property
    def label(self) -> str:
        return f"Anomaly {self.number}"


@dataclass(frozen=True)
class Findings:
    labels: np.ndarray  # (n, rows, cols) uint8/uint16, 0 = background, k = Finding k
    findings: list[Finding]


def default_min_size(shape: tuple[int, ...]) -> int:
    """Smallest region kept: 27 voxels in a volume, 0.05 % of the image (at least 16 pixels) in a radiograph."""
    if shape[0] > 1:
        return 27
    return max(16, int(0.0005 * shape[1] * shape[2]))


def find_findings(
    source: SourceSeries,
    pixel_threshold: float,
    tracking_seed: str,
    *,
    min_size: int | None = None,
    max_findings: int = 20,
) -> Findings:
    """Threshold the maps at the calibrated pixel threshold and label connected regions (3-D in a volume).

    Regions below ``min_size`` are dropped as noise; the ``max_findings`` highest-scoring are kept (a SEG with
    hundreds of segments helps nobody). Tracking UIDs are deterministic from ``tracking_seed`` and the number."""
    maps = source.maps
    mask = maps >= pixel_threshold
    structure = ndimage.generate_binary_structure(3 if source.is_volume else 2, 1)
    if source.is_volume:
        raw, count = ndimage.label(mask, structure=structure)
    else:
        raw2d, count = ndimage.label(mask[0], structure=structure)
        raw = raw2d[np.newaxis]
    if count == 0:
        return Findings(np.zeros(maps.shape, np.uint8), [])
    # bincount and per-box maxima: ndimage.maximum over a whole volume is seconds, this is tens of milliseconds.
    sizes = np.bincount(raw.ravel(), minlength=count + 1)
    limit = default_min_size(maps.shape) if min_size is None else min_size
    objects = ndimage.find_objects(raw)
    maxima: dict[int, float] = {}
    for label in np.nonzero(sizes >= limit)[0]:
        if label == 0:
            continue
        box = objects[label - 1]
        assert box is not None
        maxima[int(label)] = float(maps[box][raw[box] == label].max())
    keep = sorted(maxima, key=lambda label: maxima[label], reverse=True)[:max_findings]
    labels = np.zeros(maps.shape, dtype=np.uint8 if len(keep) < 256 else np.uint16)
    findings: list[Finding] = []
    for number, old in enumerate(keep, start=1):
        box = objects[old - 1]
        assert box is not None
        region = raw[box] == old
        labels[box][region] = number
        values = maps[box][region]
        frame_hits = np.nonzero(region.any(axis=(1, 2)))[0] + box[0].start
        peak_offsets = np.unravel_index(np.argmax(np.where(region, maps[box], -np.inf)), region.shape)
        findings.append(
            Finding(
                number=number,
                tracking_uid=derived_uid("finding", tracking_seed, number),
                size=int(region.sum()),
                max_score=float(values.max()),
                mean_score=float(values.mean()),
                frames=tuple(int(f) for f in frame_hits),
                bbox=(box[1].start, box[2].start, box[1].stop - 1, box[2].stop - 1),
                peak_frame=int(peak_offsets[0] + box[0].start),
            )
        )
    return Findings(labels, findings)


def read_sources(paths: Iterable[str], *, pixels: bool = False) -> list[Dataset]:
    """Read source instances; headers only unless pixel data are needed (Secondary Capture)."""
    return [pydicom.dcmread(path, stop_before_pixels=not pixels) for path in paths]
