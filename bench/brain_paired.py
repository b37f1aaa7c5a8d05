"""Paired comparison of two brain_mri model directories on val/: image AUROC of each and a patient-clustered
bootstrap of the difference (LGG slices grouped by patient; Kaggle images are their own group); on LGG also the
pooled Dice of each model's map at its own pixel threshold, with the same bootstrap of the difference.

    nice .venv/bin/python -m bench.brain_paired --a /tmp/brain_2.1.0 --b models/brain_mri/weights

(2.1.0's model directory: ``git archive 280e62d models/weights/brain_mri | tar x -C /tmp/old``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.brain_variants import clustered_bootstrap, patient
from dicom_node.models.brain_mri.detector import BrainMRIDetector
from dicom_node.models.evaluation import Scored, mask_for, score_files
from dicom_node.models.metrics import auroc
from dicom_node.models.preprocessing import list_image_files

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {
    "brain_kaggle": ("brain_kaggle/val/normal", "brain_kaggle/val/tumor"),
    "brain_lgg": ("brain_lgg/val/normal", "brain_lgg/val/tumor"),
}
MASKS = {"brain_lgg": "brain_lgg/val/masks"}


def overlap_counts(scored: Scored, masks_dir: Path, threshold: float) -> np.ndarray:
    """Per image (true positive, false positive, false negative) pixel counts of ``map >= threshold``."""
    rows = []
    for path, amap in zip(scored.files, scored.maps, strict=True):
        truth = mask_for([masks_dir], path, amap.shape)
        marked = amap >= threshold
        rows.append((np.sum(marked & truth), np.sum(marked & ~truth), np.sum(~marked & truth)))
    return np.asarray(rows, dtype=np.float64)


def pooled_dice(counts: np.ndarray) -> float:
    tp, fp, fn = counts.sum(axis=0)
    return float(2 * tp / max(2 * tp + fp + fn, 1.0))


def dice_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """95% interval of Dice(b) - Dice(a), resampling whole patients (as clustered_bootstrap does for AUROC)."""
    rng = np.random.default_rng(0)
    members = [np.where(groups == g)[0] for g in np.unique(groups)]
    diffs = []
    for _ in range(1000):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        diffs.append(pooled_dice(b[pick]) - pooled_dice(a[pick]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="baseline model directory")
    parser.add_argument("--b", type=Path, required=True, help="candidate model directory")
    args = parser.parse_args()
    models = {name: BrainMRIDetector.load(path, "cpu") for name, path in (("a", args.a), ("b", args.b))}
    for name, (normal, tumour) in SETS.items():
        files = list_image_files(DATA / normal) + list_image_files(DATA / tumour)
        labels = np.array([0] * len(list_image_files(DATA / normal)) + [1] * len(list_image_files(DATA / tumour)))
        scored = {key: score_files(model, files) for key, model in models.items()}
        scores = {key: value.scores for key, value in scored.items()}
        groups = np.array([patient(f.name) for f in files])
        low, high = clustered_bootstrap(labels, scores["a"], scores["b"], groups)
        a, b = auroc(labels, scores["a"]), auroc(labels, scores["b"])
        print(f"{name}: AUROC a {a:.3f}  b {b:.3f}  b - a {b - a:+.3f} (95% CI {low:+.3f} to {high:+.3f})")
        if name in MASKS:
            counts = {
                key: overlap_counts(scored[key], DATA / MASKS[name], models[key].pixel_threshold) for key in models
            }
            low, high = dice_difference(counts["a"], counts["b"], groups)
            a, b = pooled_dice(counts["a"]), pooled_dice(counts["b"])
            print(f"{name}: Dice a {a:.3f}  b {b:.3f}  b - a {b - a:+.3f} (95% CI {low:+.3f} to {high:+.3f})")


if __name__ == "__main__":
    main()
