"""Paired comparison of two brain_mri model directories on val/: image AUROC of each and a patient-clustered
bootstrap of the difference (LGG slices grouped by patient; Kaggle images are their own group).

    nice .venv/bin/python -m bench.brain_paired --a /tmp/brain_2.1.0 --b models/weights/brain_mri

(2.1.0's model directory: ``git archive 280e62d models/weights/brain_mri | tar x -C /tmp/old``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.brain_variants import clustered_bootstrap, patient
from models.brain import BrainMRIDetector
from models.evaluation import score_files
from models.metrics import auroc
from models.preprocessing import list_image_files

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {
    "brain_kaggle": ("brain_kaggle/val/normal", "brain_kaggle/val/tumor"),
    "brain_lgg": ("brain_lgg/val/normal", "brain_lgg/val/tumor"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="baseline model directory")
    parser.add_argument("--b", type=Path, required=True, help="candidate model directory")
    args = parser.parse_args()
    models = {name: BrainMRIDetector.load(path, "cpu") for name, path in (("a", args.a), ("b", args.b))}
    for name, (normal, tumour) in SETS.items():
        files = list_image_files(DATA / normal) + list_image_files(DATA / tumour)
        labels = np.array([0] * len(list_image_files(DATA / normal)) + [1] * len(list_image_files(DATA / tumour)))
        scores = {key: score_files(model, files).scores for key, model in models.items()}
        groups = np.array([patient(f.name) for f in files])
        low, high = clustered_bootstrap(labels, scores["a"], scores["b"], groups)
        a, b = auroc(labels, scores["a"]), auroc(labels, scores["b"])
        print(f"{name}: AUROC a {a:.3f}  b {b:.3f}  b - a {b - a:+.3f} (95% CI {low:+.3f} to {high:+.3f})")


if __name__ == "__main__":
    main()
