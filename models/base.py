"""The detector contract every anomaly detector implements, and the registry that names them.

This package never imports networking or the job database: the worker hands a detector pydicom datasets (or
image arrays) and gets plain numbers and arrays back.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a result: goes into the result objects (IHE AIR Contributing Equipment, TID 4019)."""

    detector: str  # "brain_mri", "chest_xray"
    method: str  # "spade+segmenter", "padim", ... (models.methods)
    version: str  # model version, changes whenever the weights change
    weights_sha256: str


@dataclass(frozen=True)
class ImageInfo:
    """What the header or a labels file says about one image besides its pixels, where known: the acquisition view
    (View Position (0018,5101), e.g. AP or PA) and the patient (to keep one patient's images in one fold). Detectors
    that do not use a field ignore it."""

    view: str | None = None
    patient: str | None = None


@dataclass(frozen=True)
class ImageScores:
    """Scores of a batch of 2-D images in the detector's own input geometry.

    ``maps`` has shape (n, rows, cols), the same rows/cols as the images given; values on the pixel-threshold
    scale (higher = more anomalous)."""

    scores: np.ndarray  # (n,) float
    maps: np.ndarray  # (n, rows, cols) float32


@dataclass(frozen=True)
class SeriesResult:
    """What a detector says about one series, mapped back to the source geometry.

    ``sop_instance_uids[i]`` is the source instance that ``image_scores[i]`` and ``anomaly_maps[i]`` belong to;
    each map has that instance's Rows x Columns, so a SEG can reference the source frames one to one."""

    model: ModelIdentity
    series_score: float
    image_threshold: float
    pixel_threshold: float
    sop_instance_uids: list[str]
    image_scores: np.ndarray  # (n,) float
    anomaly_maps: np.ndarray  # (n, rows, cols) float32
    scored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n,) which slices were scored

    @property
    def is_abnormal(self) -> bool:
        return bool(self.series_score >= self.image_threshold)

    def save(self, directory: Path) -> Path:
        """Write ``series_result.npz`` (arrays) and ``series_result.json`` (identity, thresholds) atomically.

        This is the hand-over from the detection worker to the result builders, which never import torch. The maps
        are stored sparse (a bit per pixel saying which are non-zero, then those values, uncompressed): the same
        bits as the array, about the size zlib gets (a 176-slice map volume: 17 MB against 14 MB) in a tenth of a
        second instead of more than one (docs/benchmarks.md, End to end)."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": asdict(self.model),
            "series_score": float(self.series_score),
            "image_threshold": float(self.image_threshold),
            "pixel_threshold": float(self.pixel_threshold),
            "sop_instance_uids": list(self.sop_instance_uids),
        }
        arrays: dict[str, Any] = {
            "image_scores": np.asarray(self.image_scores, dtype=np.float64),
            "scored": np.asarray(self.scored, dtype=bool),
            **pack_maps(self.anomaly_maps),
        }
        tmp_npz = directory / ".series_result.npz.tmp"
        with open(tmp_npz, "wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        tmp_npz.replace(directory / "series_result.npz")
        tmp_json = directory / ".series_result.json.tmp"
        tmp_json.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tmp_json.replace(directory / "series_result.json")
        return directory

    @classmethod
    def load(cls, directory: Path) -> SeriesResult:
        meta = json.loads((directory / "series_result.json").read_text(encoding="utf-8"))
        with np.load(directory / "series_result.npz") as arrays:
            return cls(
                model=ModelIdentity(**meta["model"]),
                series_score=float(meta["series_score"]),
                image_threshold=float(meta["image_threshold"]),
                pixel_threshold=float(meta["pixel_threshold"]),
                sop_instance_uids=list(meta["sop_instance_uids"]),
                image_scores=arrays["image_scores"],
                anomaly_maps=unpack_maps(arrays),
                scored=arrays["scored"],
            )


def pack_maps(maps: np.ndarray) -> dict[str, np.ndarray]:
    """float32 maps as ``anomaly_maps_shape``, ``anomaly_maps_nonzero`` (np.packbits of the pixels whose bits are
    not all zero, so -0.0 and NaN survive) and ``anomaly_maps_values`` (those pixels, in C order)."""
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    nonzero = maps.view(np.uint32) != 0
    return {
        "anomaly_maps_shape": np.asarray(maps.shape, dtype=np.int64),
        "anomaly_maps_nonzero": np.packbits(nonzero, axis=None),
        "anomaly_maps_values": maps[nonzero],
    }


def unpack_maps(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The maps of ``pack_maps``, or ``anomaly_maps`` as results written before it stored them whole."""
    if "anomaly_maps" in arrays:
        return np.asarray(arrays["anomaly_maps"], dtype=np.float32)
    shape = tuple(int(n) for n in arrays["anomaly_maps_shape"])
    count = int(np.prod(shape, dtype=np.int64))
    nonzero = np.unpackbits(arrays["anomaly_maps_nonzero"], count=count).view(bool).reshape(shape)
    maps = np.zeros(shape, dtype=np.float32)
    maps[nonzero] = arrays["anomaly_maps_values"]
    return maps


class DetectorError(Exception):
    """A series the detector cannot score (wrong kind of image, unreadable pixels); the message says why."""


class Detector(ABC):
    """One-class anomaly detector: fit on normal images only, score series, calibrated thresholds."""

    name: str

    @property
    @abstractmethod
    def identity(self) -> ModelIdentity: ...

    @property
    @abstractmethod
    def image_threshold(self) -> float: ...

    @property
    @abstractmethod
    def pixel_threshold(self) -> float: ...

    @abstractmethod
    def score_images(self, images: Sequence[np.ndarray]) -> ImageScores:
        """Score preprocessed 2-D float images (values in [0, 1])."""

    @abstractmethod
    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        """Score one DICOM series (any slice order; compressed pixel data allowed)."""

    @abstractmethod
    def save(self, model_dir: Path) -> None:
        """Write weights (safetensors) and the model card (model_card.json, MODEL_CARD.md) to ``model_dir``."""


DetectorLoader = Callable[[Path | None, str], Detector]
"""``loader(model_dir or None for the shipped weights, device)`` → a ready detector."""


class DetectorRegistry:
    """Maps detector names (``brain_mri``, ``chest_xray``) to loaders; tests may register their own."""

    def __init__(self) -> None:
        self._loaders: dict[str, DetectorLoader] = {}

    def register(self, name: str, loader: DetectorLoader) -> None:
        self._loaders[name] = loader

    def names(self) -> list[str]:
        return sorted(self._loaders)

    def load(self, name: str, model_dir: Path | None = None, device: str = "cpu") -> Detector:
        try:
            loader = self._loaders[name]
        except KeyError:
            raise DetectorError(f"unknown detector {name!r}; known: {', '.join(self.names())}") from None
        return loader(model_dir, device)
