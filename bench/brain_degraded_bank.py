"""A brain_mri candidate whose SPADE bank also holds degraded copies of the training normals, with the shipped
segmenter attached and calibrated as shipped (issue 21, brain part).

Step 1, the SPADE part on the CPU (``--degraded-copies``: ``config.extra["spade"]["degraded_copies"]``, see
``BrainMRIDetector.degraded_copy_settings``)::

    nice .venv/bin/dicom-node fit --detector brain_mri --method spade --device cpu --version 2.3.0-rc1 \\
        --degraded-copies res128 res192 xscale0.8 xscale1.25 \\
        --normal ../shared/data/brain_kaggle/train/normal --normal ../shared/data/brain_lgg/train/normal \\
        --calibration-normal ../shared/data/brain_kaggle/val/normal \\
        --calibration-normal ../shared/data/brain_lgg/val/normal --out /tmp/brain_candidate_spade

Step 2, attach the shipped segmenter (weights and settings) and calibrate on the val normals of both sets, as
``bench/gpu_train.py assemble`` made the shipped model::

    nice .venv/bin/python -m bench.brain_degraded_bank attach --spade /tmp/brain_candidate_spade \\
        --out /tmp/brain_candidate

It also checks that the bank's original part is the shipped bank (same patches and descriptors for the training
images), so a comparison with the shipped model measures the degraded copies alone. Step 3, measure it against the
shipped model: ``bench/brain_resolution.py --model candidate=/tmp/brain_candidate``; ``time`` here times the
scoring of the healthy Siemens series (176 slices) with both models::

    nice .venv/bin/python -m bench.brain_degraded_bank time models/brain_mri/weights /tmp/brain_candidate

Results (2026-12-07, two shared CPU cores): the fit took 31 min (about one free core; the bank alone takes about
6 min on two); the bank holds 1,589 training images plus 6,151 copies (7,740 images, 1,005,059 patches, 4.8x;
weights file 35.7 MB against 12.4 MB), its training-image part equals the shipped bank up to float16 rounding.
Fused image AUROC on val, shipped -> candidate (paired difference, 95% bootstrap interval): Kaggle as given 0.938
-> 0.943 (+0.005, -0.008 to +0.018), box256 0.930 -> 0.931 (+0.000, -0.022 to +0.020), box512 0.935 -> 0.944
(+0.010, -0.004 to +0.024), box192 0.919 -> 0.928 (+0.009, -0.010 to +0.028), box128 0.904 -> 0.925 (+0.021,
-0.007 to +0.051), stretch256 0.901 -> 0.923 (+0.023, +0.002 to +0.048), jpeg256 0.922 -> 0.929, size shuffle 0.937
-> 0.935; LGG 0.885 -> 0.886 (+0.001, -0.011 to +0.011, by patient), Dice 0.670 -> 0.666 (-0.004, -0.008 to
+0.001); Siemens series Normal, margin 0.71 -> 0.77. The SPADE part alone gains most where the normals were
degraded (box128 0.918 -> 0.936, stretch256 0.908 -> 0.929). Scoring time per series unchanged within the noise
of a shared CPU (12-16 s both). By the rule fixed in advance (box128, box192 and stretch256 each up by more than
their paired interval's half-width, 0.029 / 0.019 / 0.023) the candidate is not worth shipping: every gain is
smaller than that (stretch256 +0.0225 against 0.0232), though nothing else fell.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pydicom
import torch

from dicom_node.models.brain_mri.detector import BRAIN_CARD, WEIGHTS_DIR, BrainMRIDetector
from dicom_node.models.lesion_segmenter import STATE_PREFIX
from dicom_node.models.methods.spade import spade_part
from dicom_node.models.training import calibrate_detector

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SERIES = DATA / "dicom" / "mr_brain_t1_siemens"


def _load(model_dir: Path) -> BrainMRIDetector:
    detector = BrainMRIDetector.load(model_dir, "cpu")
    assert isinstance(detector, BrainMRIDetector)
    return detector


def same_original_bank(candidate: BrainMRIDetector, shipped: BrainMRIDetector) -> str:
    """How far the candidate bank's training-image part is from the shipped bank (float rounding only, when the
    fit reproduces the shipped one)."""
    spade, shipped_spade = spade_part(candidate.method), spade_part(shipped.method)
    assert spade is not None and shipped_spade is not None
    bank, base = spade.bank, shipped_spade.bank
    assert bank is not None and base is not None
    assert bank.patches is not None and base.patches is not None and base.offsets is not None
    assert bank.descriptors is not None and base.descriptors is not None and bank.offsets is not None
    n, rows = base.image_count, int(base.offsets[-1])
    same_layout = bank.image_count >= n and torch.equal(bank.offsets[: n + 1], base.offsets)
    detail = "layout differs"
    if same_layout:
        patches = (bank.patches[:rows].float() - base.patches.float()).abs()
        descriptors = (bank.descriptors[:n] - base.descriptors).abs().max()
        ulp = 2.0 ** (math.floor(math.log2(float(base.patches.float().abs().max()))) - 10)  # float16 spacing there
        detail = (
            f"same images and patch counts; patches max |diff| {float(patches.max()):.3g} "
            f"(mean {float(patches.mean()):.2g}; float16 spacing up to {ulp:.3g}), descriptors max |diff| "
            f"{float(descriptors):.2g}"
        )
    return (
        f"bank: {bank.image_count} images ({bank.image_count - n} degraded copies), {bank.patches.shape[0]} patches "
        f"(shipped {n} images, {rows} patches); training-image part against the shipped bank: {detail}"
    )


def attach(spade: Path, out: Path, segmenter_from: Path, version: str | None) -> None:
    detector, shipped = _load(spade), _load(segmenter_from)
    segmenter = {k: v for k, v in shipped.tensors().items() if k.startswith(STATE_PREFIX)}
    if detector.config.method != "spade" or not segmenter:
        raise SystemExit("--spade must be a spade fit and --segmenter-from a model with a segmenter")
    print(same_original_bank(detector, shipped))
    detector.config.method = "spade+segmenter"
    detector.config.version = version or detector.config.version
    detector.config.extra["segmenter"] = dict(shipped.config.extra["segmenter"])
    detector.config.extra["segmenter_training"] = dict(shipped.config.extra["segmenter_training"])
    # The method is composed from config.method: a spade+segmenter detector with the SPADE fit's bank and the
    # shipped segmenter.
    spade_fit = detector
    detector = BrainMRIDetector(spade_fit.config, "cpu")
    detector.method.load_state({**spade_fit.tensors(), **segmenter})
    detector.card = spade_fit.card
    # The card's texts are the current defaults; the SPADE fit's metrics were measured without the segmenter.
    detector.card = {k: v for k, v in detector.card.items() if k not in BRAIN_CARD and k != "metrics"}
    folders = [DATA / "brain_kaggle/val/normal", DATA / "brain_lgg/val/normal"]
    stats = calibrate_detector(detector, folders, detector.config.specificity, out)
    detector.card["calibration_folders"] = ["brain_kaggle/val/normal", "brain_lgg/val/normal"]
    detector.save(out)
    print(f"wrote {out}: {stats}")


def time_series(models: list[Path], repeat: int) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted(SERIES.iterdir()) if p.is_file()]
    for model in models:
        start = time.perf_counter()
        detector = _load(model)
        loaded = time.perf_counter() - start
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = detector.score_series(datasets)
            seconds.append(time.perf_counter() - start)
        print(
            f"{model}: load {loaded:.1f} s; {len(datasets)}-slice series scored in "
            + ", ".join(f"{s:.1f}" for s in seconds)
            + f" s (score {result.series_score:.3f}, threshold {result.image_threshold:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attach")
    a.add_argument("--spade", type=Path, required=True, help="a brain_mri fit with --method spade")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--segmenter-from", type=Path, default=WEIGHTS_DIR, help="model whose segmenter to attach")
    a.add_argument("--version", default=None)
    t = sub.add_parser("time")
    t.add_argument("models", type=Path, nargs="+")
    t.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.command == "attach":
        if args.out.resolve() == WEIGHTS_DIR.resolve():
            raise SystemExit("write candidates elsewhere, not over the shipped weights")
        attach(args.spade, args.out, args.segmenter_from, args.version)
    else:
        time_series(args.models, args.repeat)


if __name__ == "__main__":
    main()
