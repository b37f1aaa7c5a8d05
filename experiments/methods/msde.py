"""MSDE on the global (pooled) backbone features (method ``msde``; experiments.msde). Image score only (component
``msde``); the map is the constant image score inside the foreground. Hyper-parameters in ``config.extra["msde"]``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import Prepared
from dicom_node.models.methods.base import MethodScores, Progress, ScoringMethod
from dicom_node.models.methods.features import batches
from experiments.msde import MSDE

PREFIX = "msde."


class MsdeMethod(ScoringMethod):
    name = "msde"
    prefixes = (PREFIX,)
    model: MSDE | None = None

    def params(self) -> dict[str, Any]:
        """MSDE hyper-parameters (k, iterations, step, pca_dim, ridge) from ``config.extra["msde"]``; paper defaults
        for those not given."""
        integers = {"k", "iterations", "pca_dim"}
        return {
            str(k): int(v) if k in integers else float(v) for k, v in dict(self.config.extra.get("msde", {})).items()
        }

    def fit_pooled(self, pooled: Sequence[torch.Tensor]) -> None:
        self.model = MSDE(**self.params()).fit(torch.cat(list(pooled)))

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        rows: list[torch.Tensor] = []
        count = 0
        for batch in batches(prepared, self.config.batch_size):
            _, pooled = self.features.extract(batch, patches=False, pooled=True)
            assert pooled is not None
            rows.append(pooled.cpu())
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        self.fit_pooled(rows)
        return {}

    def score_pooled(self, pooled: torch.Tensor) -> list[float]:
        if self.model is None:
            raise DetectorError("the model has no MSDE (fit it first)")
        return self.model.score(pooled.cpu()).tolist()

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        scores: list[float] = []
        for batch in batches(iter(prepared), self.config.batch_size):
            _, pooled = self.features.extract(batch, patches=False, pooled=True)
            assert pooled is not None
            scores.extend(self.score_pooled(pooled))
        values = np.asarray(scores, dtype=np.float64)
        masks = np.stack([p.mask for p in prepared])
        maps = (values[:, None, None] * masks).astype(np.float32)
        return MethodScores({"msde": values}, maps)

    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state(PREFIX) if self.model is not None else {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if any(k.startswith(PREFIX) for k in tensors):
            self.model = MSDE.from_state(dict(tensors), PREFIX, **self.params())
