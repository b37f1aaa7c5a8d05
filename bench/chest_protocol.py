"""The chest detector's selection protocol: repeated, patient-grouped, view-balanced resampling (issue 21).

    nice .venv/bin/python -m bench.chest_protocol features --out /tmp/chest_feats     # once, about 3 min
    nice .venv/bin/python -m bench.chest_protocol run --features /tmp/chest_feats [--repeats 40]

Why: the 1.2.0 settings were chosen on one split (50 val normals) and lost 0.11 AUROC on held-out images, where AP
and PA come in equal shares in both classes. Here every setting is judged on many resamples instead:

- the 319 normals of train + val are split by patient, ``--repeats`` times, into a fitting part (80%) and held-out
  normals (20%); the model is fitted on the fitting part only (PaDiM is cheap once the backbone features are cached,
  so every repeat refits);
- the held-out normals are scored with the 100 val abnormals (abnormals are never fitted on; resampled by patient
  with replacement in each repeat so that their spread counts too);
- each figure is *view-balanced*: AP and PA carry equal weight within each class (weighted AUROC, weighted
  quantiles), as on a worklist where both views come in equal shares, so a score that merely tells AP from PA
  cannot look good;
- thresholds for sensitivity at 90% / 95% specificity are set per repeat on the held-out normals' scores (the
  figure is what a site gets after calibrating on its own normals, per view where the variant does that).

Printed per variant: mean and 2.5-97.5% spread over the repeats of the view-balanced AUROC, the AP and PA AUROC,
and sensitivity at 90% / 95% specificity per view. A variant is better only where its paired difference (same
resamples) keeps one sign over 95% of the repeats.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DATA = Path("../shared/data/cxr_nih")


# ------------------------------------------------------------------------------------------------ feature cache
def cache_features(out: Path) -> None:
    """Backbone features of every cxr_nih image, prepared as the shipped detector prepares them."""
    from dicom_node.models.chest_xray.detector import ChestXrayDetector

    detector = ChestXrayDetector.load(Path("models/chest_xray/weights"))
    with open(DATA / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    s8: list[torch.Tensor] = []
    s16: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    cells: list[np.ndarray] = []
    atlas: list[np.ndarray] = []
    meta: list[dict[str, str]] = []
    for start in range(0, len(rows), 8):
        batch_rows = rows[start : start + 8]
        prepared = []
        for row in batch_rows:
            split = "train" if (DATA / "train" / row["folder"] / row["file"]).exists() else "val"
            path = DATA / split / row["folder"] / row["file"]
            image = np.asarray(Image.open(path).convert("F"), dtype=np.float32) / 255.0
            prepared.append(detector.prepare(image))
            meta.append({**row, "split": split})
        images = np.stack([p.image for p in prepared])
        feats = detector.backbone.features(images, strides=(8, 16), pooled=True, pool_size=1)
        assert feats.patches is not None and feats.pooled is not None
        grid = F.adaptive_avg_pool2d(feats.patches.float(), (28, 28))
        s8.append(grid[:, :40].half())
        s16.append(grid[:, 40:].half())
        pooled.append(feats.pooled.float())
        cells.append(detector.padim.lung_cells(prepared, 28).numpy())
        atlas.append(np.stack([detector.atlas.atlas_image(p.image) for p in prepared]))
        print(f"{start + len(batch_rows)}/{len(rows)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "s8": torch.cat(s8),
            "s16": torch.cat(s16),
            "pooled": torch.cat(pooled),
            "cells": torch.from_numpy(np.concatenate(cells)),
            "atlas": torch.from_numpy(np.concatenate(atlas)),
        },
        out / "features.pt",
    )
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class Data:
    s8: torch.Tensor  # (n, 40, 28, 28)
    s16: torch.Tensor  # (n, 112, 28, 28)
    pooled: torch.Tensor  # (n, 1280)
    cells: torch.Tensor  # (n, 28, 28) lung-field cells
    atlas: torch.Tensor  # (n, 64, 64) brightness, z-scored per image (the atlas map's input)
    view: np.ndarray  # "AP" / "PA"
    patient: np.ndarray
    abnormal: np.ndarray  # bool
    split: np.ndarray  # "train" / "val"


def load(path: Path) -> Data:
    tensors = torch.load(path / "features.pt")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    return Data(
        s8=tensors["s8"].float(),
        s16=tensors["s16"].float(),
        pooled=tensors["pooled"],
        cells=tensors["cells"],
        atlas=tensors["atlas"].float(),
        view=np.array([m["view"].upper() for m in meta]),
        patient=np.array([m["patient_id"] for m in meta]),
        abnormal=np.array([m["folder"] == "abnormal" for m in meta]),
        split=np.array([m["split"] for m in meta]),
    )


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUROC with sample weights: the weighted share of (abnormal, normal) pairs ranked right (ties half)."""
    pos, neg = labels.astype(bool), ~labels.astype(bool)
    sp, wp = scores[pos], weights[pos]
    sn, wn = scores[neg], weights[neg]
    greater = (sp[:, None] > sn[None, :]).astype(np.float64) + 0.5 * (sp[:, None] == sn[None, :])
    return float((wp[:, None] * wn[None, :] * greater).sum() / (wp.sum() * wn.sum()))


def view_weights(views: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights that give AP and PA equal total weight within each class."""
    w = np.zeros(len(views))
    for label in (False, True):
        for view in ("AP", "PA"):
            chosen = (labels == label) & (views == view)
            if chosen.any():
                w[chosen] = 1.0 / chosen.sum()
    return w


def sensitivity_at(scores: np.ndarray, labels: np.ndarray, specificity: float) -> float:
    threshold = float(np.quantile(scores[~labels], specificity))
    return float((scores[labels] > threshold).mean())


Variant = Callable[[Data, np.ndarray, np.ndarray], np.ndarray]  # (data, fit idx, query idx) -> query scores


def padim_fit(features: torch.Tensor, ridge: float = 1e-2):  # type: ignore[no-untyped-def]
    from dicom_node.models.methods.padim import PositionalGaussian

    return PositionalGaussian(ridge).fit(features)


def padim_scores(model, features: torch.Tensor, cells: torch.Tensor, radius: int, top: float = 1.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Mean distance over the lung-field cells (``top`` < 1: over the highest fraction of them only)."""
    out = []
    for start in range(0, len(features), 64):
        dist = model.distances(features[start : start + 64], radius=radius)
        inside = cells[start : start + 64]
        for d, c in zip(dist, inside, strict=True):
            sel = d[c]
            sel = sel if sel.numel() else d.flatten()
            if top < 1.0:
                sel = sel.topk(max(1, int(round(top * sel.numel())))).values
            out.append(float(sel.mean()))
    return np.asarray(out)


def layer_features(data: Data, layer: str) -> torch.Tensor:
    return torch.cat([data.s8, data.s16], dim=1) if layer == "s8+s16" else getattr(data, layer)


_MEMO: dict[tuple[object, ...], np.ndarray] = {}


def memo(key: tuple[object, ...], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Variants share fits within a repeat (the key holds the index arrays' bytes)."""
    if key not in _MEMO:
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = compute()
    return _MEMO[key]


def shipped(radius: int = 2, layer: str = "s8", top: float = 1.0) -> Variant:
    def run(data: Data, fit: np.ndarray, query: np.ndarray) -> np.ndarray:
        feats = layer_features(data, layer)

        def compute() -> np.ndarray:
            return padim_scores(padim_fit(feats[fit]), feats[query], data.cells[query], radius, top)

        return memo(("raw", radius, layer, top, fit.tobytes(), query.tobytes()), compute)

    return run


def oof_scores(data: Data, fit: np.ndarray, radius: int, layer: str, top: float = 1.0, folds: int = 5) -> np.ndarray:
    """Out-of-fold scores of the fitting normals (each scored by a model fitted without its patient)."""
    return memo(("oof", radius, layer, top, folds, fit.tobytes()), lambda: _oof(data, fit, radius, layer, top, folds))


def _oof(data: Data, fit: np.ndarray, radius: int, layer: str, top: float, folds: int) -> np.ndarray:
    feats = layer_features(data, layer)
    groups = np.unique(data.patient[fit])
    rng = np.random.default_rng(0)
    fold_of = dict(zip(groups, rng.permutation(len(groups)) % folds, strict=True))
    fold = np.array([fold_of[p] for p in data.patient[fit]])
    out = np.zeros(len(fit))
    for k in range(folds):
        model = padim_fit(feats[fit[fold != k]])
        out[fold == k] = padim_scores(model, feats[fit[fold == k]], data.cells[fit[fold == k]], radius, top)
    return out


def per_view_z(
    data: Data, fit: np.ndarray, query: np.ndarray, raw: np.ndarray, ref: np.ndarray, robust: bool = False
) -> np.ndarray:
    """Query scores ``raw`` in units of the fitting normals' reference scores ``ref`` of the same view (mean and SD,
    or median and IQR / 1.349 when ``robust``)."""
    out = np.zeros(len(query))
    for view in ("AP", "PA"):
        r = ref[data.view[fit] == view]
        if robust:
            centre, spread = np.median(r), np.subtract(*np.percentile(r, [75, 25])) / 1.349
        else:
            centre, spread = r.mean(), r.std()
        chosen = data.view[query] == view
        out[chosen] = (raw[chosen] - centre) / spread
    return out


def view_normalised(radius: int = 2, layer: str = "s8", robust: bool = False, top: float = 1.0) -> Variant:
    """The shipped score z-scored per view against the fitting normals' out-of-fold scores of that view."""

    def run(data: Data, fit: np.ndarray, query: np.ndarray) -> np.ndarray:
        raw = shipped(radius, layer, top)(data, fit, query)
        return per_view_z(data, fit, query, raw, oof_scores(data, fit, radius, layer, top), robust)

    return run


def view_reference(radius: int = 2, layer: str = "s8") -> Variant:
    """A PaDiM model per view (fitted on that view's normals only), z-scored per view (out-of-fold)."""

    def run(data: Data, fit: np.ndarray, query: np.ndarray) -> np.ndarray:
        out = np.zeros(len(query))
        for view in ("AP", "PA"):
            f = fit[data.view[fit] == view]
            q = query[data.view[query] == view]
            raw = shipped(radius, layer)(data, f, q)
            ref = oof_scores(data, f, radius, layer)
            out[data.view[query] == view] = (raw - ref.mean()) / ref.std()
        return out

    return run


def atlas_scores(data: Data, fit: np.ndarray, query: np.ndarray, top: float, per_view: bool) -> np.ndarray:
    """Brightness above the normals at the same place (the shipped map's z-score, smoothed, brighter side only),
    averaged over the top ``top`` share of the lung-field pixels: opacities are denser than aerated lung."""
    from scipy import ndimage

    field = F.interpolate(data.cells[:, None].float(), size=data.atlas.shape[-2:], mode="nearest")[:, 0] > 0.5
    out = np.zeros(len(query))
    groups = ("AP", "PA") if per_view else (None,)
    for view in groups:
        f = fit if view is None else fit[data.view[fit] == view]
        q = np.arange(len(query)) if view is None else np.flatnonzero(data.view[query] == view)
        mean, std = data.atlas[f].mean(0), data.atlas[f].std(0).clamp_min(0.05)
        for i in q:
            z = ndimage.gaussian_filter(((data.atlas[query[i]] - mean) / std).numpy(), 1.5)
            values = np.clip(z[field[query[i]].numpy()], 0, None)
            values = values if values.size else np.clip(z.ravel(), 0, None)
            k = max(1, int(round(top * values.size)))
            out[i] = float(np.sort(values)[-k:].mean())
    return out


def atlas_variant(top: float = 0.1, per_view: bool = False, with_padim: float = 0.0) -> Variant:
    """The atlas brightness score, z-scored per view on out-of-fold fitting normals; optionally plus the
    view-normalised PaDiM score times ``with_padim``."""

    def run(data: Data, fit: np.ndarray, query: np.ndarray) -> np.ndarray:
        raw = atlas_scores(data, fit, query, top, per_view)
        groups = np.unique(data.patient[fit])
        fold_of = dict(zip(groups, np.random.default_rng(0).permutation(len(groups)) % 5, strict=True))
        fold = np.array([fold_of[p] for p in data.patient[fit]])
        ref = np.zeros(len(fit))
        for k in range(5):
            ref[fold == k] = atlas_scores(data, fit[fold != k], fit[fold == k], top, per_view)
        out = per_view_z(data, fit, query, raw, ref)
        if with_padim:
            out = out + with_padim * view_normalised()(data, fit, query)
        return out

    return run


def knn_variant(k: int = 5, with_padim: float = 0.0, dims: int = 64) -> Variant:
    """Global: mean distance to the k nearest fitting normals of the same view in the whitened PCA space of the
    pooled head features (1280-d), z-scored per view on out-of-fold fitting normals; optionally plus the
    view-normalised PaDiM score."""

    def raw(data: Data, fit: np.ndarray, query: np.ndarray, exclude_same: bool) -> np.ndarray:
        x = data.pooled.double()
        ref = x[fit]
        mean = ref.mean(0)
        u, sv, vt = torch.linalg.svd(ref - mean, full_matrices=False)
        basis = vt[:dims].T / (sv[:dims] / np.sqrt(len(fit)))
        zr, zq = (ref - mean) @ basis, (x[query] - mean) @ basis
        d = torch.cdist(zq, zr)
        if exclude_same:
            d = d + torch.from_numpy(data.patient[query][:, None] == data.patient[fit][None, :]) * 1e9
        out = np.zeros(len(query))
        for view in ("AP", "PA"):
            cols = torch.from_numpy(data.view[fit] == view)
            rows = data.view[query] == view
            dv = d[torch.from_numpy(rows)][:, cols]
            out[rows] = dv.topk(k, dim=1, largest=False).values.mean(1).numpy()
        return out

    def run(data: Data, fit: np.ndarray, query: np.ndarray) -> np.ndarray:
        score = raw(data, fit, query, False)
        ref = raw(data, fit, fit, True)  # leave-one-patient-out within the fitting normals
        out = per_view_z(data, fit, query, score, ref)
        if with_padim:
            out = out + with_padim * view_normalised()(data, fit, query)
        return out

    return run


def evaluate(data: Data, variants: dict[str, Variant], repeats: int, seed: int) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    normals = np.flatnonzero(~data.abnormal)
    abnormals = np.flatnonzero(data.abnormal)
    patients = np.unique(data.patient[normals])
    results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for r in range(repeats):
        held_patients = set(rng.choice(patients, size=len(patients) // 5, replace=False))
        held = np.array([i for i in normals if data.patient[i] in held_patients])
        fit = np.array([i for i in normals if data.patient[i] not in held_patients])
        ab_patients = np.unique(data.patient[abnormals])
        drawn = rng.choice(ab_patients, size=len(ab_patients), replace=True)
        ab = np.concatenate([abnormals[data.patient[abnormals] == p] for p in drawn])
        query = np.concatenate([held, ab])
        labels = data.abnormal[query]
        views = data.view[query]
        weights = view_weights(views, labels)
        for name, variant in variants.items():
            scores = variant(data, fit, query)
            row = results[name]
            row.setdefault("auroc_balanced", []).append(weighted_auroc(scores, labels, weights))
            for view in ("AP", "PA"):
                chosen = views == view
                row.setdefault(f"auroc_{view}", []).append(
                    weighted_auroc(scores[chosen], labels[chosen], weights[chosen])
                )
                for spec in (0.90, 0.95):
                    row.setdefault(f"sens{int(spec * 100)}_{view}", []).append(
                        sensitivity_at(scores[chosen], labels[chosen], spec)
                    )
            for spec in (0.90, 0.95):
                # One threshold for both views, from the pooled held-out normals (view-balanced by resampling).
                row.setdefault(f"sens{int(spec * 100)}_one_threshold", []).append(
                    balanced_sensitivity(scores, labels, views, spec)
                )
        print(f"repeat {r + 1}/{repeats}", flush=True)
    return results


def balanced_sensitivity(scores: np.ndarray, labels: np.ndarray, views: np.ndarray, specificity: float) -> float:
    """Sensitivity at one threshold set at ``specificity`` on view-balanced normals, view-balanced abnormals."""
    normal = ~labels
    per_view = [np.sort(scores[normal & (views == v)]) for v in ("AP", "PA")]
    grid = np.sort(np.concatenate(per_view))
    spec = np.array([np.mean([(s <= t).mean() for s in per_view]) for t in grid])
    threshold = grid[np.argmax(spec >= specificity)]
    return float(np.mean([(scores[labels & (views == v)] > threshold).mean() for v in ("AP", "PA")]))


def summarise(results: dict[str, dict[str, list[float]]], reference: str) -> str:
    lines = []
    keys = list(next(iter(results.values())).keys())
    for name, row in results.items():
        parts = [name]
        for key in keys:
            v = np.asarray(row[key])
            lo, hi = np.percentile(v, [2.5, 97.5])
            parts.append(f"{key} {v.mean():.3f} [{lo:.3f}, {hi:.3f}]")
        if name != reference:
            for key in ("auroc_balanced", "sens90_AP", "sens95_AP", "sens90_PA", "sens95_PA"):
                d = np.asarray(row[key]) - np.asarray(results[reference][key])
                lo, hi = np.percentile(d, [2.5, 97.5])
                parts.append(f"paired d({key}) {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append("\n  ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--features", type=Path, required=True)
    r.add_argument("--repeats", type=int, default=40)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    if args.command == "features":
        cache_features(args.out)
        return
    torch.set_num_threads(2)
    data = load(args.features)
    variants: dict[str, Variant] = {
        "shipped (padim r2, one score)": shipped(),
        "view-normalised": view_normalised(),
        "view-normalised robust": view_normalised(robust=True),
        "per-view reference": view_reference(),
        "view-normalised r1": view_normalised(radius=1),
        "view-normalised top25%": view_normalised(top=0.25),
        "view-normalised s16": view_normalised(layer="s16"),
        "view-normalised s8+s16": view_normalised(layer="s8+s16"),
        "knn pooled": knn_variant(),
        "knn pooled + padim": knn_variant(with_padim=1.0),
        "atlas top10%": atlas_variant(),
        "atlas top10% per-view": atlas_variant(per_view=True),
        "atlas top10% + padim": atlas_variant(with_padim=1.0),
        "atlas top10% per-view + padim": atlas_variant(per_view=True, with_padim=1.0),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    results = evaluate(data, variants, args.repeats, args.seed)
    print(summarise(results, next(iter(variants))))


if __name__ == "__main__":
    main()
