"""PatchCore's memory bank (Roth et al., CVPR 2022): normal patch features, nearest-neighbour distances, and the
greedy k-center coreset of the paper on a random projection.

The installed SPADE bank (models.neighbour_bank) uses its nearest-neighbour search; the PatchCore *method* (one
coreset bank for all normals) is in the repository's experiments/ folder (issue 24).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` rows chosen by greedy k-center (farthest point) selection on a random projection."""
    count = features.shape[0]
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    if features.shape[1] > projection_dim:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        reduced = features.float() @ projection.to(features.device)
    else:
        reduced = features.float()
    reduced = reduced.contiguous()
    norms = (reduced * reduced).sum(1)
    selected = torch.empty(size, dtype=torch.long)
    index = int(torch.randint(count, (1,), generator=generator))
    min_dist = torch.full((count,), float("inf"))
    for i in range(size):
        selected[i] = index
        centre = reduced[index]
        # Squared distance to the new centre: |x|^2 - 2 x.c + |c|^2 (one matrix-vector product per step).
        dist = norms - 2.0 * (reduced @ centre) + norms[index]
        torch.minimum(min_dist, dist, out=min_dist)
        index = int(torch.argmax(min_dist))
    return selected


class PatchMemoryBank:
    """Nearest-neighbour distances of patch features to a stored bank of normal patch features."""

    def __init__(self, bank: torch.Tensor | None = None) -> None:
        self.bank = bank

    def fit(
        self,
        patches: torch.Tensor,
        coreset_size: int,
        max_candidates: int = 200_000,
        seed: int = 0,
    ) -> PatchMemoryBank:
        """``patches``: (N, C) normal patch features (foreground only). Keeps a random subsample of at most
        ``max_candidates`` and selects a greedy coreset of ``coreset_size`` from it."""
        generator = torch.Generator().manual_seed(seed)
        if patches.shape[0] > max_candidates:
            keep = torch.randperm(patches.shape[0], generator=generator)[:max_candidates]
            patches = patches[keep]
        logger.info("coreset: %d of %d candidate patches", min(coreset_size, patches.shape[0]), patches.shape[0])
        indices = greedy_coreset(patches, coreset_size, seed=seed)
        self.bank = patches[indices].float().contiguous()
        return self

    def _squared_distances(self, patches: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
        """Squared distances (rows of a chunk, bank size) of each chunk of ``patches`` to every bank entry."""
        if self.bank is None:
            raise RuntimeError("memory bank not fitted")
        bank = self.bank.to(patches.device, dtype=torch.float32)
        bank_sq = (bank * bank).sum(1)
        for start in range(0, patches.shape[0], chunk):
            query = patches[start : start + chunk].float()
            # The expansion |q|^2 - 2 q.b + |b|^2 is much faster than cdist on CPU.
            yield (query * query).sum(1, keepdim=True) - 2.0 * query @ bank.T + bank_sq[None]

    @torch.inference_mode()
    def distances(self, patches: torch.Tensor, k: int = 1, chunk: int = 4096) -> torch.Tensor:
        """Mean distance of each row of ``patches`` (M, C) to its ``k`` nearest bank entries, shape (M,)."""
        out = [
            torch.topk(d2, k, dim=1, largest=False).values.clamp_min(0).sqrt().mean(1)
            for d2 in self._squared_distances(patches, chunk)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    def nearest(self, patches: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of each row's nearest bank entry (M,)."""
        out = [d2.argmin(1) for d2 in self._squared_distances(patches, chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("memory bank not fitted")
        return {f"{prefix}bank": self.bank.to(torch.float16).contiguous()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str) -> PatchMemoryBank:
        return cls(tensors[f"{prefix}bank"].float())
