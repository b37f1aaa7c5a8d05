"""SPADE-style neighbour-conditioned patch matching (method ``spade``; models.neighbour_bank).

Each query patch is compared only with the patches of the ``k_images`` training normals most like the query image,
in a whitened PCA subspace; with ``synthetic_copies`` > 0 a residual head (models.residual_head), trained on
synthetic-lesion copies of the training images (models.synthetic), turns the distance into a direction-aware patch
score. Image score = mean of the top ``topk_fraction`` foreground patch scores (component ``patchcore``, the name
the model cards have always used); map = the patch scores, upsampled and Gaussian smoothed. Settings in
``config.extra["spade"]``: k_images, pca_dims, whiten, synthetic_copies, head_weight."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import Prepared
from dicom_node.models.methods.base import MethodScores, Progress, ScoringMethod
from dicom_node.models.methods.features import batches
from dicom_node.models.neighbour_bank import NeighbourPatchBank
from dicom_node.models.synthetic import synthetic_lesion

SYNTHETIC_LESION_COVER = 0.3  # a grid patch counts as lesion when more than this fraction of it is
PREFIX = "spade."


class SpadeMethod(ScoringMethod):
    name = "spade"
    prefixes = (PREFIX,)
    bank: NeighbourPatchBank | None = None

    def params(self) -> dict[str, Any]:
        """SPADE bank hyper-parameters (k_images, pca_dims, whiten) from ``config.extra["spade"]``."""
        params = dict(self.config.extra.get("spade", {}))
        return {
            "k_images": int(params.get("k_images", 20)),
            "pca_dims": int(params.get("pca_dims", 16)),
            "whiten": bool(params.get("whiten", True)),
        }

    def head_params(self) -> tuple[int, float]:
        """Residual head (models.residual_head) settings from ``config.extra["spade"]``: synthetic-lesion copies per
        training image (0: no head, plain distances) and the head's weight."""
        params = dict(self.config.extra.get("spade", {}))
        return int(params.get("synthetic_copies", 0)), float(params.get("head_weight", 4.0))

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        cfg = self.config
        copies, head_weight = self.head_params()
        rng = np.random.default_rng(cfg.seed)
        per_image: list[torch.Tensor] = []
        synthetic: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        count = 0
        for batch in batches(prepared, cfg.batch_size):
            patches, _ = self.features.extract(batch)
            assert patches is not None
            grid_mask = self.features.grid_masks(batch, (int(patches.shape[-2]), int(patches.shape[-1])))
            grid_mask = grid_mask.to(patches.device)
            # SPADE keeps which image each patch came from
            per_image += [
                p.permute(1, 2, 0)[m].cpu().to(torch.float16) for p, m in zip(patches, grid_mask, strict=True)
            ]
            for _ in range(copies):
                synthetic += self._synthetic_rows(batch, grid_mask.cpu(), count, rng)
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        self.bank = NeighbourPatchBank(**self.params()).fit(per_image, seed=cfg.seed)
        if copies:
            # Bank indices skip training images without foreground.
            kept = {i: n for n, i in enumerate(i for i, rows in enumerate(per_image) if rows.shape[0] > 0)}
            usable = [(kept[i], rows, lesion) for i, rows, lesion in synthetic if i in kept]
            self.bank.fit_head(usable, head_weight, seed=cfg.seed)
        return {}

    def _synthetic_rows(
        self, batch: Sequence[Prepared], grid_mask: torch.Tensor, first: int, rng: np.random.Generator
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """One synthetic-lesion copy of each image of ``batch`` (models.synthetic; the next image is the donor):
        (training image index, foreground patch features (M, C), patch is mostly lesion (M,)). Patches a lesion
        only grazes (0-30% of their area) are left out: neither normal nor lesion."""
        made: list[tuple[int, Prepared, np.ndarray]] = []
        for offset, item in enumerate(batch):
            donor = batch[(offset + 1) % len(batch)].image
            painted = synthetic_lesion(item.image, item.mask, donor, rng)
            if painted is not None:
                made.append((offset, replace(item, image=painted[0]), painted[1]))
        if not made:
            return []
        patches, _ = self.features.extract([copy for _, copy, _ in made])
        assert patches is not None
        grid = (int(patches.shape[-2]), int(patches.shape[-1]))
        out = []
        for (offset, _, lesion), features in zip(made, patches, strict=True):
            cover = F.adaptive_avg_pool2d(torch.from_numpy(lesion.astype(np.float32))[None, None], grid)[0, 0]
            fg = grid_mask[offset]
            keep = (cover[fg] > SYNTHETIC_LESION_COVER) | (cover[fg] == 0)
            rows = features.permute(1, 2, 0).cpu()[fg][keep]
            out.append((first + offset, rows, (cover[fg] > SYNTHETIC_LESION_COVER)[keep]))
        return out

    def foreground_rows(self, batch: Sequence[Prepared]) -> list[torch.Tensor]:
        """Foreground patch features (P_i, C) float16 of each prepared image, as the fit keeps them (for extra
        reference images that join the bank, e.g. models.brain's degraded copies)."""
        patches, _ = self.features.extract(batch)
        assert patches is not None
        grid_mask = self.features.grid_masks(batch, (int(patches.shape[-2]), int(patches.shape[-1])))
        grid_mask = grid_mask.to(patches.device)
        return [p.permute(1, 2, 0)[m].cpu().to(torch.float16) for p, m in zip(patches, grid_mask, strict=True)]

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        """Image score = mean of the top foreground patch scores; map = the patch scores, upsampled, smoothed."""
        if self.bank is None:
            raise DetectorError(f"{self.config.method}: the model has no SPADE bank (fit it first)")
        cfg = self.config
        size = cfg.image_size
        scores: list[float] = []
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        offset = 0
        for batch in batches(iter(prepared), cfg.batch_size):
            patches, _ = self.features.extract(batch)
            assert patches is not None
            n, _, h, w = patches.shape
            dist = self.bank.distances(patches, self.features.grid_masks(batch, (h, w)))
            scores.extend(self.features.patch_scores(batch, dist))
            grid_mask = self.features.grid_masks(batch, (h, w), cfg.rim_patches)
            maps[offset : offset + n] = self.features.distance_maps(batch, dist, grid_mask)
            offset += len(batch)
        return MethodScores({"patchcore": np.asarray(scores, dtype=np.float64)}, maps)

    # -------------------------------------------------------------------------------------------- persistence
    def state(self) -> dict[str, torch.Tensor]:
        return self.bank.state(PREFIX) if self.bank is not None else {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if any(k.startswith(PREFIX) for k in tensors):
            self.bank = NeighbourPatchBank.from_state(
                dict(tensors), PREFIX, k_images=self.params()["k_images"], head_weight=self.head_params()[1]
            )


def spade_part(method: ScoringMethod) -> SpadeMethod | None:
    """The SPADE part of a method: the method itself, its ``spade`` component (``spade+segmenter``) or None."""
    if isinstance(method, SpadeMethod):
        return method
    part = getattr(method, "spade", None)
    return part if isinstance(part, SpadeMethod) else None
