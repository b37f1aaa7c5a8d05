"""Compare brain-MRI methods (PatchCore, MSDE, their sum, the autoencoder: experiments/) on cached features
(bench/brain_features.py), with the detector's own components.

    nice .venv/bin/python -m experiments.bench.brain_compare --features /tmp/brain_feats

Fits each method on brain_kaggle/train + brain_lgg/train normals, sets the image threshold at the 95th percentile
of the pooled val normals (both datasets, as the shipped model does) and the pixel threshold at a quantile of the
normal val maps' foreground pixels, and prints image AUROC/AP, sensitivity/specificity, pixel AUROC/AP and Dice per
dataset. Numbers for the shipped default come from ``dicom-node evaluate`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from dicom_node.models.metrics import auroc, average_precision, dice, sensitivity_specificity
from dicom_node.models.patchcore import PatchMemoryBank
from dicom_node.models.preprocessing import CropBox, uncrop_square
from experiments.msde import MSDE


def load(features: Path, split: str, tag: str) -> dict[str, Any]:
    return torch.load(features / f"{split}_{tag}.pt", weights_only=False)


def grid_mask(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0] > 0.5


def patch_scores(
    bank: PatchMemoryBank, data: dict[str, Any], topk: float, sigma: float, size: int, erode: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    patches = data["patches"]
    n, c, h, w = patches.shape
    gmask = grid_mask(data["masks"], (h, w))
    dists = []
    for start in range(0, n, 32):
        chunk = patches[start : start + 32].float()
        flat = chunk.permute(0, 2, 3, 1).reshape(-1, c)
        dists.append(bank.distances(flat).reshape(-1, h, w))
    dist = torch.cat(dists)
    if erode:
        inner = torch.from_numpy(np.stack([ndimage.binary_erosion(m, iterations=erode) for m in gmask.numpy()]))
        gmask = inner
    dist = torch.where(gmask, dist, torch.zeros_like(dist))
    scores_max, scores_topk = np.zeros(n), np.zeros(n)
    for i in range(n):
        fg = dist[i][gmask[i]]
        if fg.numel():
            scores_max[i] = float(fg.max())
            k = max(1, int(round(topk * fg.numel())))
            scores_topk[i] = float(torch.topk(fg, k).values.mean())
    up = F.interpolate(dist[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    masks = data["masks"].numpy()
    maps = np.stack([ndimage.gaussian_filter(up[i], sigma) * masks[i] for i in range(n)]).astype(np.float32)
    return scores_max, scores_topk, maps


def source_maps(maps: np.ndarray, data: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for amap, box in zip(maps, data["boxes"].tolist(), strict=True):
        top, left, size, rows, cols = box
        out.append(uncrop_square(amap, CropBox(top, left, size, (rows, cols))))
    return out


def pixel_metrics(maps: list[np.ndarray], data: dict[str, Any], quantiles: list[float]) -> dict[str, float]:
    truths = []
    for f in data["files"]:
        mask_path = Path(f).parent.parent / "masks" / Path(f).name
        truths.append(np.asarray(Image.open(mask_path)) > 0)
    truth = np.concatenate([t.ravel() for t in truths])
    value = np.concatenate([m.ravel() for m in maps])
    labels = data["labels"].numpy().astype(bool)
    normal_fg = np.concatenate([m[m > 0] for m, lab in zip(maps, labels, strict=True) if not lab])
    out = {"pixel_auroc": auroc(truth, value), "pixel_ap": average_precision(truth, value)}
    for q in quantiles:
        out[f"dice@q{q}"] = dice(value >= np.quantile(normal_fg, q), truth)
    return out


def report(name: str, scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
    normals = np.concatenate([scores[d][~labels[d]] for d in scores])
    threshold = float(np.quantile(normals, 0.95))
    for dataset in scores:
        y, s = labels[dataset], scores[dataset]
        sens, spec = sensitivity_specificity(y, s, threshold)
        line = f"{name:<28} {dataset:<7} AUROC {auroc(y, s):.3f} AP {average_precision(y, s):.3f} "
        line += f"sens {sens:.3f} spec {spec:.3f}"
        for key, value in extra.get(dataset, {}).items():
            line += f" {key} {value:.3f}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=Path, default=Path("/tmp/brain_feats"))
    parser.add_argument("--tag", default="efficientnet-lite0_256")
    parser.add_argument("--coreset", type=int, default=6000)
    parser.add_argument("--candidates", type=int, default=60000)
    parser.add_argument("--topk", type=float, default=0.01)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--erode", type=int, default=0, help="ignore this many patches at the head's rim")
    parser.add_argument("--train", nargs="*", default=["kaggle_train", "lgg_train"])
    parser.add_argument("--ae-seconds", type=float, default=600)
    parser.add_argument("--methods", nargs="*", default=["patchcore", "msde", "knn", "combined"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = [load(args.features, s, args.tag) for s in args.train]
    val = {"kaggle": load(args.features, "kaggle_val", args.tag), "lgg": load(args.features, "lgg_val", args.tag)}
    labels = {d: v["labels"].numpy().astype(bool) for d, v in val.items()}
    size = int(val["lgg"]["masks"].shape[-1])
    results: dict[str, dict[str, np.ndarray]] = {}
    extras: dict[str, dict[str, Any]] = {}
    if "patchcore" in args.methods or "combined" in args.methods:
        rows = []
        for t in train:
            p = t["patches"]
            g = grid_mask(t["masks"], (p.shape[-2], p.shape[-1]))
            rows.append(p.permute(0, 2, 3, 1)[g])
        started = time.time()
        bank = PatchMemoryBank().fit(torch.cat(rows), args.coreset, max_candidates=args.candidates)
        print(f"coreset {args.coreset} of {sum(r.shape[0] for r in rows)} patches in {time.time() - started:.0f}s")
        pc_max, pc_topk, pix = {}, {}, {}
        for d, v in val.items():
            started = time.time()
            smax, stopk, maps = patch_scores(bank, v, args.topk, args.sigma, size, args.erode)
            pc_max[d], pc_topk[d] = smax, stopk
            if d == "lgg":
                pix[d] = pixel_metrics(source_maps(maps, v), v, [0.99, 0.995, 0.999, 0.9995])
            print(f"scored {d} in {time.time() - started:.0f}s", flush=True)
        report("patchcore max", pc_max, labels, {})
        report(f"patchcore top{args.topk}", pc_topk, labels, pix)
        results["patchcore"] = pc_topk
        extras["patchcore"] = pix
    train_pooled = torch.cat([t["pooled"] for t in train]).double()
    if "msde" in args.methods or "combined" in args.methods:
        started = time.time()
        msde = MSDE().fit(train_pooled)
        results["msde"] = {d: msde.score(v["pooled"]).numpy() for d, v in val.items()}
        print(f"msde fit+score {time.time() - started:.0f}s")
        report("msde", results["msde"], labels, {})
    if "knn" in args.methods:
        mean, std = train_pooled.mean(0), train_pooled.std(0) + 1e-6
        ref = (train_pooled - mean) / std
        knn = {}
        for d, v in val.items():
            q = (v["pooled"].double() - mean) / std
            knn[d] = torch.cdist(q, ref).topk(5, largest=False).values.mean(1).numpy()
        report("global kNN k=5", knn, labels, {})
    if "autoencoder" in args.methods:
        from dicom_node.models.brain_mri.detector import default_config
        from dicom_node.models.config import Prepared
        from experiments.autoencoder import fit_autoencoder, score_autoencoder

        def prepared(data: dict[str, Any]) -> list[Prepared]:
            images = data["images"].numpy().astype(np.float32) / 255.0
            masks = data["masks"].numpy()
            box = CropBox(0, 0, size, (size, size))
            return [Prepared(image=i, mask=m, box=box) for i, m in zip(images, masks, strict=True)]

        config = default_config()
        config.image_size = size
        config.extra["ae_train_seconds"] = args.ae_seconds
        started = time.time()
        model = fit_autoencoder([p for t in train for p in prepared(t)], config, "cpu")
        print(f"autoencoder trained {config.extra['ae_epochs_trained']} epochs in {time.time() - started:.0f}s")
        ae, pix = {}, {}
        for d, v in val.items():
            started = time.time()
            ae[d], maps = score_autoencoder(model, prepared(v), config, "cpu")
            print(f"ae scored {d}: {len(ae[d]) / (time.time() - started):.1f} images/s")
            if d == "lgg":
                pix[d] = pixel_metrics(source_maps(maps, v), v, [0.99, 0.995, 0.999, 0.9995])
        report("denoising autoencoder", ae, labels, pix)
    if "combined" in args.methods:
        combined = {}
        stats = {}
        for name in ("patchcore", "msde"):
            normals = np.concatenate([results[name][d][~labels[d]] for d in val])
            stats[name] = (normals.mean(), normals.std())
        for d in val:
            combined[d] = sum((results[n][d] - stats[n][0]) / stats[n][1] for n in ("patchcore", "msde"))
        report("patchcore+msde (z-sum)", combined, labels, extras.get("patchcore", {}))


if __name__ == "__main__":
    main()
