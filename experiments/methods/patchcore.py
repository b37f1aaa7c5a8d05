"""PatchCore (method ``patchcore``; the brain_mri 1.0.x default): one coreset memory bank of locally averaged patch
features for all normals (dicom_node.models.patchcore). Image score = mean of the top ``topk_fraction`` foreground
patch distances (component ``patchcore``); map = patch distances, upsampled and Gaussian smoothed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import Prepared
from dicom_node.models.methods.base import MethodScores, Progress, ScoringMethod
from dicom_node.models.methods.features import batches
from dicom_node.models.patchcore import PatchMemoryBank

PREFIX = "patchcore."


class PatchCoreMethod(ScoringMethod):
    name = "patchcore"
    prefixes = (PREFIX,)
    bank: PatchMemoryBank | None = None

    def foreground_rows(self, batch: Sequence[Prepared], patches: torch.Tensor) -> torch.Tensor:
        grid_mask = self.features.grid_masks(batch, (int(patches.shape[-2]), int(patches.shape[-1])))
        return patches.permute(0, 2, 3, 1)[grid_mask.to(patches.device)].cpu().to(torch.float16)

    def fit_rows(self, rows: Sequence[torch.Tensor]) -> None:
        cfg = self.config
        self.bank = PatchMemoryBank().fit(
            torch.cat(list(rows)), cfg.coreset_size, max_candidates=cfg.max_candidates, seed=cfg.seed
        )

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        rows: list[torch.Tensor] = []
        count = 0
        for batch in batches(prepared, self.config.batch_size):
            patches, _ = self.features.extract(batch)
            assert patches is not None
            rows.append(self.foreground_rows(batch, patches))
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        self.fit_rows(rows)
        return {}

    def score_batch(self, batch: Sequence[Prepared], patches: torch.Tensor) -> tuple[list[float], np.ndarray]:
        """(image scores, maps) of one batch from its patch features."""
        if self.bank is None:
            raise DetectorError("the model has no PatchCore bank (fit it first)")
        n, c, h, w = patches.shape
        flat = patches.permute(0, 2, 3, 1).reshape(-1, c)
        dist = self.bank.distances(flat, k=self.config.knn).reshape(n, h, w).cpu()
        grid_mask = self.features.grid_masks(batch, (h, w), self.config.rim_patches)
        return self.features.patch_scores(batch, dist), self.features.distance_maps(batch, dist, grid_mask)

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        size = self.config.image_size
        scores: list[float] = []
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        offset = 0
        for batch in batches(iter(prepared), self.config.batch_size):
            patches, _ = self.features.extract(batch)
            assert patches is not None
            batch_scores, maps[offset : offset + len(batch)] = self.score_batch(batch, patches)
            scores.extend(batch_scores)
            offset += len(batch)
        return MethodScores({"patchcore": np.asarray(scores, dtype=np.float64)}, maps)

    def state(self) -> dict[str, torch.Tensor]:
        return self.bank.state(PREFIX) if self.bank is not None else {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if any(k.startswith(PREFIX) for k in tensors):
            self.bank = PatchMemoryBank.from_state(dict(tensors), PREFIX)
