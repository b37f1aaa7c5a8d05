"""The interface of a scoring method: what a detector composes instead of switching on method names.

A method is fitted on prepared normal images, calibrated on prepared held-out normals (a step of its own that
*returns* the statistics it needs, never a flag that makes scoring write state), scores prepared images into
component scores and anomaly maps, and turns its components into the reported image score. Its fitted state is a
set of safetensors tensors (under the method's prefixes) plus entries of ``config.extra`` (the model card's
``config.extra``) that ``fit`` and ``calibrate`` return for the detector to record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from dicom_node.models.base import ImageInfo
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.methods.features import PatchFeatures
from dicom_node.models.metrics import threshold_at_specificity

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MethodScores:
    """``components``: raw score per component {name: (n,)}; ``maps``: (n, S, S) in the prepared geometry, on the
    pixel-threshold scale."""

    components: dict[str, np.ndarray]
    maps: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """What calibrating on held-out normals found: ``statistics`` (entries of ``config.score_stats``: [mean, std]
    per component and whatever scale the method needs before it can score), the normals' reported ``scores`` and
    ``maps``, the ``image_threshold`` at the asked specificity and ``extra`` (entries of ``config.extra``)."""

    statistics: dict[str, list[float]]
    scores: np.ndarray
    maps: np.ndarray
    image_threshold: float
    extra: dict[str, Any] = field(default_factory=dict)


def component_statistics(components: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """[mean, std] of each component on the calibration normals."""
    return {name: [float(v.mean()), float(v.std() + 1e-12)] for name, v in components.items()}


def z_sum(
    components: Mapping[str, np.ndarray],
    statistics: Mapping[str, Sequence[float]],
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """One component as it is; several: the (weighted) sum of their z-scores against ``statistics`` (components with
    weight 0 left out; no statistics: mean 0, std 1)."""
    if len(components) == 1:
        return next(iter(components.values()))
    total = np.zeros_like(next(iter(components.values())))
    for name, values in components.items():
        weight = 1.0 if weights is None else float(weights.get(name, 1.0))
        if weight == 0.0:
            continue
        mean, std = statistics.get(name, [0.0, 1.0])
        if weights is None:
            total = total + (values - mean) / max(std, 1e-12)
        else:
            total = total + weight * (values - mean) / max(std, 1e-12)
    return total


class ScoringMethod(ABC):
    """One anomaly-scoring method of a detector (fitted on normals only).

    ``prefixes``: the safetensors key prefixes of its state (``load`` recognises a method's tensors by them)."""

    name: ClassVar[str]
    prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DetectorConfig, features: PatchFeatures) -> None:
        self.config = config
        self.features = features

    @property
    def device(self) -> torch.device:
        return self.features.device

    @abstractmethod
    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None
    ) -> dict[str, Any]:
        """Fit on prepared normal images (a stream; ``info`` per image where known); returns ``config.extra`` entries
        to record (a None value removes the entry)."""

    @abstractmethod
    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        """Component scores and maps of prepared images (needs a fitted and, where the method says so, calibrated
        model: the statistics are read from ``config.score_stats``)."""

    def image_scores(
        self, prepared: Sequence[Prepared], components: Mapping[str, np.ndarray], statistics: Mapping[str, Any]
    ) -> np.ndarray:
        """The reported image scores from the components (default: :func:`z_sum`)."""
        return z_sum(components, statistics)

    def calibrate(self, prepared: Sequence[Prepared], specificity: float) -> Calibration:
        """Score the held-out normals and derive the statistics and the image threshold at ``specificity``."""
        return self.calibration(prepared, self.score(prepared), {}, specificity)

    def calibration(
        self,
        prepared: Sequence[Prepared],
        scored: MethodScores,
        statistics: Mapping[str, list[float]],
        specificity: float,
    ) -> Calibration:
        """The default calibration of scored normals: component statistics (after the method's own ``statistics``),
        reported scores from them, threshold at ``specificity``."""
        found = {**statistics, **component_statistics(scored.components)}
        scores = self.image_scores(prepared, scored.components, found)
        return Calibration(found, scores, scored.maps, threshold_at_specificity(scores, specificity))

    def card_thresholds(self) -> dict[str, Any]:
        """Thresholds beyond the image, pixel and series ones, for the model card (none by default)."""
        return {}

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (keys under ``prefixes``)."""

    @abstractmethod
    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore the fitted tensors from a weights file's ``tensors``."""


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
