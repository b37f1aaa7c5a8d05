"""Variants of the shipped brain SPADE model (2.0.0), scored on cached features (bench/brain_features.py).

    nice .venv/bin/python -m bench.brain_features --out /tmp/brain_feats --size 256
    nice .venv/bin/python -m bench.brain_variants --features /tmp/brain_feats

Each variant changes one thing against the shipped setting (Lite0 block 10, 3x3 pooled, whitened 16-d PCA, 20
neighbours by mean foreground feature, top 1% of the foreground patch distances, rim 1) and prints image AUROC on
brain_kaggle/val and brain_lgg/val. Ends with a patient-clustered bootstrap of the best LGG variant against the shipped
one, and the case that shows why LGG misses large lesions. Results: docs/benchmarks.md (brain, session 3).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from dicom_node.models.metrics import auroc
from dicom_node.models.neighbour_bank import NeighbourPatchBank

TRAIN = ("kaggle_train", "lgg_train")
VAL = ("kaggle_val", "lgg_val")
TAG = "efficientnet-lite0_256"
GRID = 16


def grid_masks(masks: torch.Tensor, rim: int = 0) -> torch.Tensor:
    grid = (F.adaptive_avg_pool2d(masks.float()[:, None], GRID)[:, 0] > 0.5).numpy()
    if rim:
        grid = np.stack([ndimage.binary_erosion(m, iterations=rim) for m in grid])
    return torch.from_numpy(np.ascontiguousarray(grid))


def patient(path: str) -> str:
    """LGG patient (TCGA_XX_NNNN) from the file name; other files are their own group."""
    match = re.match(r"(TCGA_[A-Z0-9]+_[A-Z0-9]+)_", Path(path).name)
    return match.group(1) if match else Path(path).name


def nearest(query: torch.Tensor, bank: torch.Tensor, forbid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    d2 = (query * query).sum(1, keepdim=True) - 2 * query @ bank.T + (bank * bank).sum(1)[None]
    if forbid is not None:
        d2 = d2.masked_fill(forbid, float("inf"))
    value, index = d2.min(1)
    value = value.clamp_min(0).sqrt()
    return torch.where(torch.isinf(value), torch.zeros_like(value), value), index


def top_fraction(dist: torch.Tensor, inside: torch.Tensor, fraction: float = 0.01) -> np.ndarray:
    out = np.zeros(dist.shape[0])
    for i in range(dist.shape[0]):
        values = dist[i][inside[i]]
        if values.numel():
            out[i] = float(torch.topk(values, max(1, round(fraction * values.numel()))).values.mean())
    return out


class Setup:
    """The shipped bank on the cached training features, plus per-image training rows for the variants."""

    def __init__(self, features: Path) -> None:
        self.data = {s: torch.load(features / f"{s}_{TAG}.pt", weights_only=False) for s in TRAIN + VAL}
        per_image, self.files, self.positions, self.images, self.masks = [], [], [], [], []
        for split in TRAIN:
            d = self.data[split]
            columns = (d["patches"], grid_masks(d["masks"]), d["files"], d["images"], d["masks"])
            for p, m, f, img, mask in zip(*columns, strict=True):
                if m.any():
                    per_image.append(p.permute(1, 2, 0)[m])
                    self.files.append(f)
                    self.positions.append(torch.nonzero(m).float())
                    self.images.append(img)
                    self.masks.append(mask)
        self.bank = NeighbourPatchBank(k_images=20, pca_dims=16, whiten=True).fit(per_image)
        assert self.bank.patches is not None and self.bank.offsets is not None
        offsets = self.bank.offsets.tolist()
        self.rows = [self.bank.patches[a:b].float() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def neighbours(self, raw_rows: torch.Tensor, k: int = 20, exclude: torch.Tensor | None = None) -> list[int]:
        bank = self.bank
        assert bank.descriptors is not None and bank.descriptor_mean is not None and bank.descriptor_std is not None
        query = (bank.descriptor(raw_rows) - bank.descriptor_mean) / bank.descriptor_std
        distance = torch.cdist(query[None], bank.descriptors)[0]
        if exclude is not None:
            distance[exclude] = float("inf")
        return torch.topk(distance, k, largest=False).indices.tolist()

    def cross_fit_distances(self) -> list[torch.Tensor]:
        """Each training patch's distance to the patches of its 20 neighbours from *other* patients (other files for
        Kaggle): what a normal patch's distance looks like, without the patch itself in the bank."""
        assert self.bank.descriptors is not None
        groups = np.array([patient(f) for f in self.files])
        out = []
        for i in range(len(self.files)):
            distance = torch.cdist(self.bank.descriptors[i][None], self.bank.descriptors)[0]
            distance[torch.from_numpy(groups == groups[i])] = float("inf")
            chosen = torch.topk(distance, 20, largest=False).indices.tolist()
            out.append(nearest(self.rows[i], torch.cat([self.rows[j] for j in chosen]))[0])
        return out


Variant = Callable[[Setup, dict[str, Any], int, torch.Tensor], torch.Tensor]


def shipped(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
    raw = d["patches"][i].permute(1, 2, 0)[fg].float()
    chosen = setup.neighbours(raw)
    return nearest(setup.bank.project(raw), torch.cat([setup.rows[j] for j in chosen]))[0]


def reranked(candidates: int = 100, keep: float = 0.5) -> Variant:
    """Take ``candidates`` neighbours by descriptor, keep the 20 whose patches explain the query best (mean of the
    lower ``keep`` fraction of the query's patch distances): a large lesion shifts the mean descriptor, not that."""

    def variant(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
        raw = d["patches"][i].permute(1, 2, 0)[fg].float()
        query = setup.bank.project(raw)
        pool = setup.neighbours(raw, k=candidates)
        fit = []
        for j in pool:
            dist = nearest(query, setup.rows[j])[0]
            fit.append(float(torch.topk(dist, max(1, int(keep * dist.numel())), largest=False).values.mean()))
        chosen = [pool[j] for j in torch.topk(torch.tensor(fit), 20, largest=False).indices.tolist()]
        return nearest(query, torch.cat([setup.rows[j] for j in chosen]))[0]

    return variant


def local_outlier(weight: float, self_distance: list[torch.Tensor]) -> Variant:
    """Patch distance minus ``weight`` x the matched training patch's own cross-fit distance (LOF-like)."""
    flat = torch.cat(self_distance)

    def variant(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
        raw = d["patches"][i].permute(1, 2, 0)[fg].float()
        chosen = setup.neighbours(raw)
        assert setup.bank.offsets is not None
        index = torch.cat([torch.arange(int(setup.bank.offsets[j]), int(setup.bank.offsets[j + 1])) for j in chosen])
        dist, match = nearest(setup.bank.project(raw), torch.cat([setup.rows[j] for j in chosen]))
        return dist - weight * flat[index[match]]

    return variant


def positional(radius: int) -> Variant:
    """Match only training patches within ``radius`` grid cells of the query patch's position."""

    def variant(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
        raw = d["patches"][i].permute(1, 2, 0)[fg].float()
        chosen = setup.neighbours(raw)
        where = torch.cat([setup.positions[j] for j in chosen])
        far = torch.cdist(torch.nonzero(fg).float(), where, p=float("inf")) > radius
        return nearest(setup.bank.project(raw), torch.cat([setup.rows[j] for j in chosen]), far)[0]

    return variant


def brightness(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean intensity per grid cell relative to the head's median intensity."""
    x = img.float() / 255
    median = x[mask.bool()].median() if mask.any() else torch.tensor(1.0)
    return F.avg_pool2d(x[None, None], 256 // GRID)[0, 0] / median.clamp_min(1e-3)


def with_brightness(weight: float) -> Variant:
    def variant(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
        raw = d["patches"][i].permute(1, 2, 0)[fg].float()
        chosen = setup.neighbours(raw)
        query = torch.cat([setup.bank.project(raw), weight * brightness(d["images"][i], d["masks"][i])[fg][:, None]], 1)
        bank = []
        for j in chosen:
            cells = grid_masks(setup.masks[j][None])[0]
            level = brightness(setup.images[j], setup.masks[j])[cells]
            bank.append(torch.cat([setup.rows[j], weight * level[:, None]], 1))
        return nearest(query, torch.cat(bank))[0]

    return variant


def with_asymmetry(weight: float) -> Variant:
    """Shipped distance + ``weight`` x the distance of each patch to its best mirror-image patch (left-right, within
    one cell): gliomas are one-sided, the brain is not."""

    def variant(setup: Setup, d: dict[str, Any], i: int, fg: torch.Tensor) -> torch.Tensor:
        c = d["patches"].shape[1]
        grid = setup.bank.project(d["patches"][i].permute(1, 2, 0).reshape(-1, c).float()).reshape(GRID, GRID, -1)
        mirror, mirror_fg = grid.flip(1), fg.flip(1)
        best = torch.full((GRID, GRID), float("inf"))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.roll(mirror, (dy, dx), (0, 1))
                dist = (grid - shifted).norm(dim=-1)
                best = torch.minimum(best, torch.where(torch.roll(mirror_fg, (dy, dx), (0, 1)), dist, best))
        best[torch.isinf(best)] = 0
        return shipped(setup, d, i, fg) + weight * best[fg]

    return variant


def distance_grids(setup: Setup, split: str, variant: Variant) -> torch.Tensor:
    d = setup.data[split]
    fg = grid_masks(d["masks"])
    out = torch.zeros(fg.shape[0], GRID, GRID)
    for i in range(fg.shape[0]):
        if fg[i].any():
            out[i][fg[i]] = variant(setup, d, i, fg[i])
    return out


def clustered_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """95% interval of AUROC(b) - AUROC(a), resampling whole groups (patients)."""
    rng = np.random.default_rng(0)
    members = {g: np.where(groups == g)[0] for g in np.unique(groups)}
    keys = list(members)
    diffs = []
    for _ in range(1000):
        pick = np.concatenate([members[g] for g in rng.choice(keys, len(keys))])
        if len(set(labels[pick])) == 2:
            diffs.append(auroc(labels[pick], b[pick]) - auroc(labels[pick], a[pick]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=Path, default=Path("/tmp/brain_feats"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    setup = Setup(args.features)
    self_distance = setup.cross_fit_distances()
    flat_self = torch.cat(self_distance)
    variants: dict[str, Variant] = {
        "shipped 2.0.0": shipped,
        "re-ranked neighbours (100 candidates, best 50% of patches)": reranked(),
        "minus 0.5 x matched patch's cross-fit distance (LOF-like)": local_outlier(0.5, self_distance),
        "positions within 3 cells only": positional(3),
        "+ brightness relative to head median (weight 10)": with_brightness(10.0),
        "+ 0.25 x left-right asymmetry": with_asymmetry(0.25),
    }
    grids: dict[str, dict[str, torch.Tensor]] = {}
    labels = {s: setup.data[s]["labels"].numpy() for s in VAL}
    inside = {s: grid_masks(setup.data[s]["masks"], rim=1) for s in VAL}
    for name, variant in variants.items():
        grids[name] = {s: distance_grids(setup, s, variant) for s in VAL}
        row = [f"{auroc(labels[s], top_fraction(grids[name][s], inside[s])):.3f}" for s in VAL]
        print(f"| {name} | {' | '.join(row)} |", flush=True)
    base = grids["shipped 2.0.0"]
    threshold = float(torch.quantile(flat_self, 0.9))
    aggregates: dict[str, Callable[[torch.Tensor, torch.Tensor], np.ndarray]] = {
        "score: top 10% instead of top 1%": lambda g, m: top_fraction(g, m, 0.1),
        f"score: mean excess over q0.9 of cross-fit train distances ({threshold:.1f})": lambda g, m: np.array(
            [float((g[i][m[i]] - threshold).clamp_min(0).mean()) if m[i].any() else 0.0 for i in range(len(g))]
        ),
        "score: summed excess over the same (rewards head area)": lambda g, m: np.array(
            [float((g[i][m[i]] - threshold).clamp_min(0).sum()) for i in range(len(g))]
        ),
        "head area in grid cells alone (the bias the sum picks up)": lambda g, m: m.sum((1, 2)).numpy().astype(float),
    }
    for name, aggregate in aggregates.items():
        row = [f"{auroc(labels[s], aggregate(base[s], inside[s])):.3f}" for s in VAL]
        print(f"| {name} | {' | '.join(row)} |", flush=True)
    best = "re-ranked neighbours (100 candidates, best 50% of patches)"
    for s in VAL:
        groups = np.array([patient(f) for f in setup.data[s]["files"]])
        a = top_fraction(base[s], inside[s])
        b = top_fraction(grids[best][s], inside[s])
        low, high = clustered_bootstrap(labels[s], a, b, groups)
        gain = auroc(labels[s], b) - auroc(labels[s], a)
        print(f"{s}: re-ranked - shipped = {gain:+.3f} (95% CI {low:+.3f}..{high:+.3f})")
    quantiles = [round(float(torch.quantile(flat_self, q)), 1) for q in (0.5, 0.9, 0.99)]
    print("patch-distance quantiles q0.5/q0.9/q0.99, cross-fit train:", quantiles)
    missed_lesions(setup, base["lgg_val"], inside["lgg_val"])


def missed_lesions(setup: Setup, grid: torch.Tensor, inside: torch.Tensor) -> None:
    """LGG tumour slices below the 95%-specificity threshold, by lesion area (pixels of the 256 x 256 mask)."""
    d = setup.data["lgg_val"]
    labels = d["labels"].numpy()
    scores = top_fraction(grid, inside)
    threshold = np.quantile(scores[labels == 0], 0.95)
    areas = np.array([lesion_area(f) for f in d["files"]])
    for low, high in ((0, 500), (500, 2000), (2000, 10**6)):
        sel = (labels == 1) & (areas >= low) & (areas < high)
        print(f"lesion area {low}-{high} px: {int((scores[sel] < threshold).sum())} of {int(sel.sum())} missed")


def lesion_area(path: str) -> int:
    mask = Path(path).parent.parent / "masks" / Path(path).name
    return int((np.asarray(Image.open(mask).convert("L")) > 127).sum()) if mask.exists() else 0


if __name__ == "__main__":
    main()
