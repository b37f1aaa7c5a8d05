"""Does the brain detector read image size / sharpness? brain_kaggle/val scored as given and with the cue removed.

    nice .venv/bin/python -m bench.brain_resolution [--variant res160 ...] [--version box128 ...] [--lgg] [--series]

(the results below: ``--variant res160 --variant res192 --variant res128 --version given --version box256 --version
box512 --version shuffle --version box192 --version box128 --version stretch256 --version jpeg256 --lgg --series
--weights 0,1,1.5,2,3``: about 25 min on two shared CPU cores, seconds once cached)

The Kaggle normals are mostly small (about 225 px) and the tumours mostly 512 x 512, so after the head crop is
resized to the 256-px working size the normals are soft (upsampled) and the tumours sharp (downsampled). Held-out
evaluators bring every image to one box first. This scores brain_kaggle/val (100 normal, 99 tumour) with the shipped
model, through the product's own path (``models.evaluation.load_images``, then ``prepare`` and the fused SPADE +
segmenter scoring of ``dicom-node evaluate``), in these versions:

- ``given``: the files as they are (the number ``dicom-node evaluate`` gives);
- ``box256`` / ``box512``: each image resized (aspect kept, bilinear, anti-aliased) to fit 256 x 256 / 512 x 512,
  padded with black to the square, stored as 8 bit: every image has the same size and pixel count;
- ``shuffle`` (control): each image resized to fit the native size of another image drawn at random (sizes permuted
  across both classes), so size still varies but says nothing about the class.

It prints the native sizes per class, then per variant x version the image AUROC with a bootstrap 95% interval
(stratified, 2,000 draws) of the fused score and of its two parts: ``spade`` (mean of the top 1% of the SPADE map
in standard deviations, z) and ``seg`` (mean of the top 1% of 2 x the lesion probability p), so one sees which part
reads the cue. Variants are scoring-time preparation changes with the shipped weights (``shipped``; ``resN``: the
head crop brought to at most N px across before the resize to 256, :class:`CappedBrainDetector`). A variant's map
scale (``score_stats.spade_map``) and thresholds are recalibrated on the as-given val normals of both sets, as
``dicom-node calibrate`` would (for ``shipped`` this reproduces the shipped calibration). ``--lgg`` adds
brain_lgg/val (image AUROC with a patient-clustered interval, pooled pixel Dice at the recalibrated pixel threshold,
and the paired differences against ``shipped``); ``--series`` scores the healthy Siemens T1 series
(../shared/data/dicom/mr_brain_t1_siemens) against the recalibrated series threshold. Component maps are cached in
/tmp/brain_resolution (one file per variant and version), so reruns only redo the statistics. ``--weights`` re-fuses
the cached parts with other segmenter weights (no rescoring). Extra versions (``--version``): ``boxN`` for any N,
``aliasN`` (boxN without anti-aliasing, as OpenCV's default resize), ``stretchN`` (N x N, aspect not kept), ``jpegN``
(boxN, then a JPEG q75 round trip).
``--model NAME=DIR`` (repeatable) scores another model directory (e.g. a refit) as a variant NAME with the shipped
preparation, recalibrated the same way, with paired differences against ``shipped`` (AUROC, and with ``--lgg`` the
pooled Dice, patient-resampled); bench/brain_degraded_bank.py uses it for a bank with degraded copies.

Results (shipped 2.2.1, val; fused image AUROC, 95% interval): Kaggle as given 0.938 (0.904-0.969),
box256 0.930, box512 0.935, size shuffle 0.937, box192 0.919, box128 0.904, stretch256 0.901, jpeg256 0.922; LGG
0.885, Dice 0.670. The shipped model does not read the native size on val (big and small normals rank the same
against the tumours; the SPADE part alone keeps 0.938 in box256 and the shuffle). What costs AUROC is a degraded
normal: low effective resolution (box192/128) or a distorted aspect (stretch; the tumours are square 512 x 512,
many normals are not) raises the normals' SPADE score (+0.3 to +0.6 z) while the tumours' scores barely move; the
segmenter part (0.70 alone) drops to about 0.66 under any re-sampling. Capping the head crop at 128/160/192 px
(resN) lowers AUROC everywhere (paired differences -0.01 to -0.05) and narrows the healthy Siemens series' margin
(series score / threshold 0.71 shipped, 0.79-0.95 capped); a lower segmenter weight (1 instead of 2) gains about
0.01 on the low-resolution versions and loses 0.006 on LGG.
"""

from __future__ import annotations

import argparse
import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image

from bench.brain_variants import patient
from dicom_node.models.brain_mri.detector import WEIGHTS_DIR, BrainMRIDetector
from dicom_node.models.evaluation import load_images, mask_for
from dicom_node.models.image_detector import Prepared
from dicom_node.models.lesion_segmenter import full_size
from dicom_node.models.methods.spade_segmenter import SpadeSegmenterMethod
from dicom_node.models.metrics import auroc, threshold_at_specificity, top_mean
from dicom_node.models.preprocessing import (
    CropBox,
    crop_square,
    foreground_mask,
    list_image_files,
    normalise_foreground,
    resize,
    square_crop_box,
    uncrop_square,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = Path("/tmp/brain_resolution")
KAGGLE = ("brain_kaggle/val/normal", "brain_kaggle/val/tumor")
LGG = ("brain_lgg/val/normal", "brain_lgg/val/tumor")
LGG_MASKS = "brain_lgg/val/masks"
SERIES = DATA / "dicom" / "mr_brain_t1_siemens"
VERSIONS = ("given", "box256", "box512", "shuffle")
BATCH = 32
DRAWS = 2000
MODELS: dict[str, Path] = {}  # --model NAME=DIR: other model directories, scored with the shipped preparation


# ------------------------------------------------------------------------------------------------ image versions
def fit_box(image: np.ndarray, rows: int, cols: int, antialias: bool = True) -> np.ndarray:
    """``image`` resized with its aspect kept to fit ``rows`` x ``cols``, centred, padded with black, 8-bit.
    ``antialias=False``: plain bilinear sampling (as OpenCV's default resize does), aliasing when shrinking."""
    scale = min(rows / image.shape[0], cols / image.shape[1])
    shape = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    if antialias:
        small = resize(image, shape)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        small = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((rows, cols), dtype=np.float32)
    top, left = (rows - shape[0]) // 2, (cols - shape[1]) // 2
    out[top : top + shape[0], left : left + shape[1]] = small
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.float32) / 255.0


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """An 8-bit JPEG round trip (quality ``quality``)."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def versioned(images: list[np.ndarray], version: str, seed: int = 0) -> list[np.ndarray]:
    if version == "given":
        return images
    if version.startswith("box"):
        side = int(version[3:])
        return [fit_box(img, side, side) for img in images]
    if version.startswith("alias"):
        side = int(version[5:])
        return [fit_box(img, side, side, antialias=False) for img in images]
    if version.startswith("stretch"):
        side = int(version[7:])
        return [np.round(np.clip(resize(img, (side, side)), 0, 1) * 255).astype(np.float32) / 255 for img in images]
    if version.startswith("jpeg"):
        return [jpeg(img) for img in versioned(images, "box" + version[4:])]
    if version == "shuffle":
        order = np.random.default_rng(seed).permutation(len(images))
        return [fit_box(img, *images[j].shape) for img, j in zip(images, order, strict=True)]
    raise ValueError(f"unknown version {version!r}")


# ------------------------------------------------------------------------------------------------------- scoring
@dataclass
class Raw:
    """Per image: SPADE map and lesion probability (prepared geometry), head mask, crop box."""

    spade: np.ndarray  # (n, S, S) float16
    probability: np.ndarray  # (n, 128, 128) float16
    masks: np.ndarray  # (n, S, S) bool
    boxes: np.ndarray  # (n, 5) top, left, size, rows, cols


class CappedBrainDetector(BrainMRIDetector):
    """The brain detector whose preparation brings the head crop to at most ``resolution`` px across (anti-aliased)
    before the resize to the working size, so every source has one effective resolution; 0: the shipped
    preparation. A scoring-time change only (the weights are the shipped ones)."""

    resolution = 0

    def prepare(self, image: np.ndarray) -> Prepared:
        if not self.resolution:
            return super().prepare(image)
        size = self.config.image_size
        mask = foreground_mask(image)
        box = square_crop_box(mask)
        crop = crop_square(image, box)
        if box.size > self.resolution:
            crop = resize(crop, (self.resolution, self.resolution))
        square = resize(crop, (size, size))
        square_mask = resize(crop_square(mask.astype(np.float32), box), (size, size), order=0) > 0.5
        return Prepared(image=normalise_foreground(square, square_mask), mask=square_mask, box=box)


def set_variant(detector: CappedBrainDetector, variant: str) -> None:
    if variant.startswith("res"):
        detector.resolution = int(variant[3:])
    elif variant == "shipped" or variant in MODELS:
        detector.resolution = 0
    else:
        raise ValueError(f"unknown variant {variant!r}")


def fused_method(detector: BrainMRIDetector) -> SpadeSegmenterMethod:
    """The model's spade+segmenter method (its SPADE and segmenter parts)."""
    if not isinstance(detector.method, SpadeSegmenterMethod):
        raise SystemExit(f"{detector.config.method}: a spade+segmenter model is needed")
    return detector.method


def raw_components(detector: CappedBrainDetector, images: Sequence[np.ndarray]) -> Raw:
    fused = fused_method(detector)
    spade: list[np.ndarray] = []
    probability: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    boxes: list[tuple[int, ...]] = []
    for start in range(0, len(images), BATCH):
        prepared = [detector.prepare(np.asarray(img, dtype=np.float32)) for img in images[start : start + BATCH]]
        maps = fused.spade.score(prepared).maps
        spade.append(maps.astype(np.float16))
        probability.append(fused.segmenter.probability(prepared).astype(np.float16))
        masks.append(np.stack([p.mask for p in prepared]))
        boxes.extend((p.box.top, p.box.left, p.box.size, *p.box.source_shape) for p in prepared)
    return Raw(np.concatenate(spade), np.concatenate(probability), np.concatenate(masks), np.asarray(boxes))


def cached_raw(detector: CappedBrainDetector, variant: str, tag: str, files: list[Path], version: str) -> Raw:
    identity = "|".join([detector.weights_sha256, variant, version, *map(str, files)])
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    path = CACHE / f"{variant}_{tag}_{version}_{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return Raw(data["spade"], data["probability"], data["masks"], data["boxes"])
    set_variant(detector, variant)
    raw = raw_components(detector, versioned(load_images(files), version))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, spade=raw.spade, probability=raw.probability, masks=raw.masks, boxes=raw.boxes)
    return raw


@dataclass
class Calibration:
    spade_map: tuple[float, float]
    image_threshold: float
    pixel_threshold: float
    normal_scores: np.ndarray


def fused(raw: Raw, spade_map: tuple[float, float], weight: float, size: int) -> dict[str, np.ndarray]:
    """Scores as ``ImageAnomalyDetector._fused_raw`` computes them, plus each part alone, and the fused maps."""
    mean, std = spade_map
    masks = raw.masks
    z = (raw.spade.astype(np.float32) - mean) / std
    p = full_size(raw.probability.astype(np.float32), size) * masks
    evidence = (z + weight * p) * masks
    out = {
        "fused": np.array([top_mean(e[m], 0.01) for e, m in zip(evidence, masks, strict=True)]),
        "spade": np.array([top_mean(v[m], 0.01) for v, m in zip(z, masks, strict=True)]),
        "seg": np.array([top_mean(weight * v[m], 0.01) for v, m in zip(p, masks, strict=True)]),
    }
    out_maps = np.sqrt(p * np.clip(z, 0, None)) * masks
    return {**out, "maps": out_maps.astype(np.float32)}


def calibrate(normals: list[Raw], weight: float, size: int, specificity: float, quantile: float) -> Calibration:
    """What ``BrainMRIDetector.calibrate`` sets, from the calibration normals' raw components."""
    head = np.concatenate([r.spade[r.masks].astype(np.float64) for r in normals])
    spade_map = (float(head.mean()), float(head.std() + 1e-12))
    parts = [fused(r, spade_map, weight, size) for r in normals]
    scores = np.concatenate([p["fused"] for p in parts])
    pixels = np.concatenate([p["maps"][r.masks] for p, r in zip(parts, normals, strict=True)])
    return Calibration(
        spade_map=spade_map,
        image_threshold=threshold_at_specificity(scores, specificity),
        pixel_threshold=float(np.quantile(pixels, quantile)),
        normal_scores=scores,
    )


# ---------------------------------------------------------------------------------------------------- statistics
def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> tuple[float, ...]:
    """AUROC and its 95% interval: stratified resampling of images, or of whole ``groups`` (patients)."""
    rng = np.random.default_rng(0)
    values = []
    if groups is None:
        pos, neg = np.nonzero(labels)[0], np.nonzero(~labels)[0]
        for _ in range(DRAWS):
            pick = np.r_[rng.choice(neg, neg.size), rng.choice(pos, pos.size)]
            values.append(auroc(labels[pick], scores[pick]))
    else:
        members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
        for _ in range(DRAWS):
            pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
            if 0 < labels[pick].sum() < pick.size:
                values.append(auroc(labels[pick], scores[pick]))
    low, high = np.quantile(values, [0.025, 0.975])
    return auroc(labels, scores), float(low), float(high)


def paired_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> tuple[float, ...]:
    """AUROC(b) - AUROC(a) and its 95% interval, resampling groups (images or patients)."""
    rng = np.random.default_rng(1)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    diffs = []
    for _ in range(DRAWS):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if 0 < labels[pick].sum() < pick.size:
            diffs.append(auroc(labels[pick], b[pick]) - auroc(labels[pick], a[pick]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return auroc(labels, b) - auroc(labels, a), float(low), float(high)


def dice_counts(raw: Raw, maps: np.ndarray, files: list[Path], threshold: float) -> np.ndarray:
    """Per image (overlap, marked, truth) pixel counts of ``map >= threshold`` against the LGG masks (n, 3)."""
    counts = []
    masks_dir = DATA / LGG_MASKS
    for amap, box, path in zip(maps, raw.boxes, files, strict=True):
        crop = CropBox(top=int(box[0]), left=int(box[1]), size=int(box[2]), source_shape=(int(box[3]), int(box[4])))
        source = uncrop_square(amap, crop)
        truth = mask_for([masks_dir], path, source.shape)
        if truth.shape != source.shape:
            source = resize(source, truth.shape)
        marked = source >= threshold
        counts.append((int((marked & truth).sum()), int(marked.sum()), int(truth.sum())))
    return np.asarray(counts, dtype=np.float64)


def paired_dice_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> tuple[float, ...]:
    """Pooled Dice(b) - Dice(a) from per-image counts (:func:`dice_counts`) and its 95% interval, resampling
    patients."""

    def pooled(counts: np.ndarray) -> float:
        total = counts.sum(0)
        return float(2 * total[0] / max(total[1] + total[2], 1.0))

    rng = np.random.default_rng(2)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    diffs = []
    for _ in range(DRAWS):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        diffs.append(pooled(b[pick]) - pooled(a[pick]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return pooled(b) - pooled(a), float(low), float(high)


def fmt(value: tuple[float, ...]) -> str:
    return f"{value[0]:.3f} ({value[1]:.3f}-{value[2]:.3f})"


def fmt_diff(value: tuple[float, ...]) -> str:
    return f"{value[0]:+.3f} ({value[1]:+.3f} to {value[2]:+.3f})"


# ---------------------------------------------------------------------------------------------------------- main
def native_sizes(files: Sequence[Path]) -> str:
    sizes = []
    for f in files:
        with Image.open(f) as img:
            sizes.append(img.size)
    longest = np.array([max(s) for s in sizes])
    common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in Counter(sizes).most_common(3))
    return (
        f"longest side median {np.median(longest):.0f} px (quartiles {np.percentile(longest, 25):.0f}-"
        f"{np.percentile(longest, 75):.0f}), {np.mean(longest >= 500):.0%} >= 500 px; most common {common}"
    )


def series_verdict(detector: CappedBrainDetector, variant: str, calibration: Calibration) -> str:
    set_variant(detector, variant)
    cfg = detector.config
    cfg.score_stats["spade_map"] = list(calibration.spade_map)
    cfg.image_threshold = calibration.image_threshold
    cfg.pixel_threshold = calibration.pixel_threshold
    # The series threshold as BrainMRIDetector.calibrate sets it, from these normal slice scores.
    rng = np.random.default_rng(cfg.seed)
    n = int(detector._param("max_scored_slices"))
    draws = rng.choice(calibration.normal_scores, size=(int(detector._param("series_bootstrap")), n), replace=True)
    cfg.extra["series_threshold"] = float(np.quantile([detector.series_aggregate(r) for r in draws], cfg.specificity))
    datasets = [pydicom.dcmread(p) for p in sorted(SERIES.iterdir()) if p.is_file()]
    result = detector.score_series(datasets)
    verdict = "Abnormal" if result.series_score >= result.image_threshold else "Normal"
    return (
        f"series score {result.series_score:.3f}, threshold {result.image_threshold:.3f} "
        f"(ratio {result.series_score / result.image_threshold:.2f}) -> {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="shipped (default) or resN, repeatable")
    parser.add_argument(
        "--version",
        action="append",
        default=[],
        help=f"of {', '.join(VERSIONS)} (default), boxN, aliasN (boxN without anti-aliasing), "
        "stretchN (no aspect), jpegN (boxN + JPEG q75)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another model directory (e.g. a refit), a variant NAME scored with the shipped preparation; repeatable",
    )
    parser.add_argument("--lgg", action="store_true", help="also brain_lgg/val (AUROC, Dice)")
    parser.add_argument("--series", action="store_true", help="also the healthy Siemens T1 series")
    parser.add_argument(
        "--weights", default="", help="comma-separated segmenter weights (shipped 2): fused AUROC of each, no rescoring"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    for spec in args.model:
        name, _, folder = spec.partition("=")
        if not folder or name == "shipped" or name.startswith("res"):
            parser.error(f"--model {spec!r}: NAME=DIR, NAME neither shipped nor resN")
        MODELS[name] = Path(folder)
    variants = args.variant or ["shipped"]
    if "shipped" not in variants:
        variants.insert(0, "shipped")
    variants += [name for name in MODELS if name not in variants]
    versions = args.version or list(VERSIONS)
    detector = CappedBrainDetector.load(WEIGHTS_DIR, "cpu")
    assert isinstance(detector, CappedBrainDetector)
    detectors = {variant: detector for variant in variants}
    for name, folder in MODELS.items():
        other = CappedBrainDetector.load(folder, "cpu")
        assert isinstance(other, CappedBrainDetector)
        if (
            fused_method(other).segmenter.settings().score_weight
            != fused_method(detector).segmenter.settings().score_weight
        ):
            parser.error(f"--model {name}: another segmenter weight than the shipped model's")
        detectors[name] = other
    weight = fused_method(detector).segmenter.settings().score_weight
    size = detector.config.image_size
    spec, quantile = detector.config.specificity, detector.config.pixel_quantile
    shipped_stats = tuple(detector.config.score_stats["spade_map"])

    kaggle_normal, kaggle_tumour = (list_image_files(DATA / d) for d in KAGGLE)
    kaggle_files = kaggle_normal + kaggle_tumour
    kaggle_labels = np.r_[np.zeros(len(kaggle_normal), bool), np.ones(len(kaggle_tumour), bool)]
    lgg_normal, lgg_tumour = (list_image_files(DATA / d) for d in LGG)
    lgg_files = lgg_normal + lgg_tumour
    lgg_labels = np.r_[np.zeros(len(lgg_normal), bool), np.ones(len(lgg_tumour), bool)]
    lgg_groups = np.array([patient(str(f)) for f in lgg_files])
    print(f"brain_kaggle/val normal ({len(kaggle_normal)}): {native_sizes(kaggle_normal)}")
    print(f"brain_kaggle/val tumour ({len(kaggle_tumour)}): {native_sizes(kaggle_tumour)}")

    scores: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    raws: dict[tuple[str, str], tuple[Raw, Calibration]] = {}
    lgg_dice: dict[str, np.ndarray] = {}
    for variant in variants:
        detector = detectors[variant]
        lines = []
        kaggle_given = cached_raw(detector, variant, "kaggle", kaggle_files, "given")
        lgg_given = cached_raw(detector, variant, "lgg", lgg_files, "given")
        n_normal = len(kaggle_normal)
        normals = [
            Raw(*(getattr(kaggle_given, f)[:n_normal] for f in ("spade", "probability", "masks", "boxes"))),
            Raw(*(getattr(lgg_given, f)[: len(lgg_normal)] for f in ("spade", "probability", "masks", "boxes"))),
        ]
        calibration = calibrate(normals, weight, size, spec, quantile)
        note = f"spade_map {calibration.spade_map[0]:.2f}/{calibration.spade_map[1]:.2f}"
        if variant == "shipped":
            note += f" (shipped {shipped_stats[0]:.2f}/{shipped_stats[1]:.2f})"
        lines.append(f"{variant}: recalibrated {note}, image threshold {calibration.image_threshold:.3f}")
        for version in versions:
            raw = kaggle_given if version == "given" else cached_raw(detector, variant, "kaggle", kaggle_files, version)
            parts = fused(raw, calibration.spade_map, weight, size)
            scores[(variant, f"kaggle/{version}")] = parts
            raws[(variant, f"kaggle/{version}")] = (raw, calibration)
            cells = "  ".join(f"{k} {fmt(bootstrap_auroc(kaggle_labels, parts[k]))}" for k in ("fused", "spade", "seg"))
            lines.append(f"  kaggle {version:<10} {cells}")
        if args.lgg:
            parts = fused(lgg_given, calibration.spade_map, weight, size)
            scores[(variant, "lgg/given")] = parts
            raws[(variant, "lgg/given")] = (lgg_given, calibration)
            cells = "  ".join(
                f"{k} {fmt(bootstrap_auroc(lgg_labels, parts[k], lgg_groups))}" for k in ("fused", "spade", "seg")
            )
            lgg_dice[variant] = dice_counts(lgg_given, parts["maps"], lgg_files, calibration.pixel_threshold)
            total = lgg_dice[variant].sum(0)
            score_dice = float(2 * total[0] / max(total[1] + total[2], 1.0))
            lines.append(f"  lgg    {'given':<10} {cells}  Dice {score_dice:.3f}")
        if args.series:
            lines.append(f"  siemens T1 series: {series_verdict(detector, variant, calibration)}")
        print("\n".join(lines), flush=True)

    if len(variants) > 1:
        print("\nfused AUROC difference against shipped (paired bootstrap; LGG by patient):")
        for variant in variants[1:]:
            for key in [f"kaggle/{v}" for v in versions] + (["lgg/given"] if args.lgg else []):
                labels, groups = (
                    (lgg_labels, lgg_groups)
                    if key.startswith("lgg")
                    else (kaggle_labels, np.arange(len(kaggle_labels)).astype(str))
                )
                diff = paired_difference(
                    labels, scores[("shipped", key)]["fused"], scores[(variant, key)]["fused"], groups
                )
                print(f"  {variant:<8} {key:<16} {fmt_diff(diff)}  half-width {(diff[2] - diff[1]) / 2:.3f}")
            if args.lgg:
                diff = paired_dice_difference(lgg_dice["shipped"], lgg_dice[variant], lgg_groups)
                print(f"  {variant:<8} {'lgg/Dice':<16} {fmt_diff(diff)}")

    if args.weights:
        keys = [f"kaggle/{v}" for v in versions] + (["lgg/given"] if args.lgg else [])
        print("\nfused AUROC by segmenter weight (score = top 1% of z + weight x p):")
        print(f"  {'variant':<8} {'weight':>6}  " + " ".join(f"{k:>16}" for k in keys))
        for variant in variants:
            for value in (float(w) for w in args.weights.split(",")):
                row = []
                for key in keys:
                    raw, calibration = raws[(variant, key)]
                    labels = lgg_labels if key.startswith("lgg") else kaggle_labels
                    row.append(f"{auroc(labels, fused(raw, calibration.spade_map, value, size)['fused']):>16.3f}")
                print(f"  {variant:<8} {value:>6.1f}  " + " ".join(row))


if __name__ == "__main__":
    main()
