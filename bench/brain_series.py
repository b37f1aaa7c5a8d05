"""Time the brain detector on a real DICOM series and show its verdict.

    nice .venv/bin/python -m bench.brain_series [--series ../shared/data/dicom/mr_brain_t1_siemens] [--model DIR]

Prints the series score and threshold, slices scored, wall time for the whole series (file reading excluded,
decoding included) and ms per source slice. Run on an otherwise idle machine for speed numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from dicom_node.models.registry import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=Path, default=DATA / "dicom" / "mr_brain_t1_siemens")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    detector = default_registry().load("brain_mri", args.model, args.device)
    datasets = [pydicom.dcmread(p) for p in sorted(args.series.iterdir()) if p.is_file()]
    detector.score_series(datasets[:4])  # warm-up
    times = []
    result = None
    for _ in range(args.repeat):
        started = time.perf_counter()
        result = detector.score_series(datasets)
        times.append(time.perf_counter() - started)
    assert result is not None
    best = min(times)
    print(f"series: {args.series.name}, {len(datasets)} instances, device {args.device}")
    print(
        f"series score {result.series_score:.4f}, threshold {result.image_threshold:.4f}, abnormal {result.is_abnormal}"
    )
    print(f"slices with head {int(result.scored.sum())}, max slice score {float(np.max(result.image_scores)):.4f}")
    print(
        f"wall time best of {args.repeat}: {best:.2f} s = {1000 * best / len(datasets):.1f} ms/slice "
        f"(all runs: {', '.join(f'{t:.2f}' for t in times)} s)"
    )


if __name__ == "__main__":
    main()
