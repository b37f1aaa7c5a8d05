"""PatchCore and MSDE together (method ``patchcore+msde``; the chest_xray 1.0.0 recipe on the generic features):
both from one backbone pass, each z-scored against the calibration normals and summed (score); the PatchCore map,
z-scored like its score, is the map."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.methods.base import (
    Calibration,
    MethodScores,
    Progress,
    ScoringMethod,
    component_statistics,
    z_sum,
)
from dicom_node.models.methods.features import PatchFeatures, batches
from dicom_node.models.metrics import threshold_at_specificity
from experiments.methods.msde import MsdeMethod
from experiments.methods.patchcore import PatchCoreMethod


class PatchCoreMsdeMethod(ScoringMethod):
    name = "patchcore+msde"
    prefixes = (*PatchCoreMethod.prefixes, *MsdeMethod.prefixes)

    def __init__(self, config: DetectorConfig, features: PatchFeatures) -> None:
        super().__init__(config, features)
        self.patchcore = PatchCoreMethod(config, features)
        self.msde = MsdeMethod(config, features)

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        rows: list[torch.Tensor] = []
        pooled_rows: list[torch.Tensor] = []
        count = 0
        for batch in batches(prepared, self.config.batch_size):
            patches, pooled = self.features.extract(batch, patches=True, pooled=True)
            assert patches is not None and pooled is not None
            rows.append(self.patchcore.foreground_rows(batch, patches))
            pooled_rows.append(pooled.cpu())
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        self.patchcore.fit_rows(rows)
        self.msde.fit_pooled(pooled_rows)
        return {}

    def _raw(self, prepared: Sequence[Prepared]) -> MethodScores:
        size = self.config.image_size
        patch_scores: list[float] = []
        msde_scores: list[float] = []
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        offset = 0
        for batch in batches(iter(prepared), self.config.batch_size):
            patches, pooled = self.features.extract(batch, patches=True, pooled=True)
            assert patches is not None and pooled is not None
            batch_scores, maps[offset : offset + len(batch)] = self.patchcore.score_batch(batch, patches)
            patch_scores.extend(batch_scores)
            msde_scores.extend(self.msde.score_pooled(pooled))
            offset += len(batch)
        components = {
            "patchcore": np.asarray(patch_scores, dtype=np.float64),
            "msde": np.asarray(msde_scores, dtype=np.float64),
        }
        return MethodScores(components, maps)

    @staticmethod
    def _scaled(maps: np.ndarray, statistics: Mapping[str, Sequence[float]]) -> np.ndarray:
        mean, std = statistics.get("patchcore", [0.0, 1.0])
        return ((maps - mean) / max(std, 1e-12)).astype(np.float32)

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        raw = self._raw(prepared)
        return MethodScores(raw.components, self._scaled(raw.maps, self.config.score_stats))

    def calibrate(self, prepared: Sequence[Prepared], specificity: float) -> Calibration:
        raw = self._raw(prepared)
        statistics = component_statistics(raw.components)
        scores = z_sum(raw.components, statistics)
        maps = self._scaled(raw.maps, statistics)
        return Calibration(statistics, scores, maps, threshold_at_specificity(scores, specificity))

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.patchcore.state(), **self.msde.state()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.patchcore.load_state(tensors)
        self.msde.load_state(tensors)
