"""Time to build the result objects of the real 176-slice Siemens T1 series (and of the CR chest).

Run: ``.venv/bin/python -m bench.results [--repeat N]``. Synthetic anomaly maps (two blobs above the threshold)
stand in for a detector; source headers are read once, outside the timing, as the pipeline does before building.
Target (issue 5): SEG + SR + PM for 176 slices ≤ 2 s on the dev CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.models.base import ModelIdentity, SeriesResult
from dicom_node.results.build import ObjectRequest, build_results

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
BRAIN = DATA / "mr_brain_t1_siemens"
CHEST = DATA / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"


def synthetic(headers: Sequence[Dataset], detector: str) -> SeriesResult:
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    rng = np.random.default_rng(0)
    maps = rng.random((len(headers), rows, columns), dtype=np.float32) * 0.3
    if len(headers) > 1:
        maps[80:95, 100:130, 90:120] = 0.9
        maps[30:34, 40:48, 40:48] = 0.7
    else:
        maps[0, rows // 3 : rows // 2, columns // 5 : columns // 2] = 0.95
    scores = maps.reshape(len(headers), -1).max(axis=1).astype(np.float64)
    return SeriesResult(
        model=ModelIdentity(detector, "bench", "bench-1", "0" * 64),
        series_score=float(scores.max()),
        image_threshold=0.5,
        pixel_threshold=0.5,
        sop_instance_uids=[str(h.SOPInstanceUID) for h in headers],
        image_scores=scores,
        anomaly_maps=maps,
        scored=np.ones(len(headers), dtype=bool),
    )


def timed(function: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def case(name: str, files: list[Path], detector: str, kinds: list[str], repeat: int) -> None:
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    by_uid = {str(h.SOPInstanceUID): path for h, path in zip(headers, files, strict=True)}
    result = synthetic(headers, detector)
    requests = [ObjectRequest(kind) for kind in kinds]

    def build() -> object:
        return build_results(
            headers, result, requests, read_pixels=lambda ds: pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)])
        )

    build()  # warm-up: imports, highdicom's lazy tables
    times = timed(build, repeat)
    print(
        f"{name:<34} {'+'.join(kinds):<14} median {statistics.median(times):6.2f} s  "
        f"min {min(times):6.2f} s  max {max(times):6.2f} s  (n={repeat})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    brain = sorted(BRAIN.glob("*.dcm"))
    case(f"brain T1, {len(brain)} slices", brain, "brain_mri", ["SEG", "SR", "PM"], args.repeat)
    case(f"brain T1, {len(brain)} slices", brain, "brain_mri", ["SEG", "SR", "PM", "SC"], args.repeat)
    case("CR chest 1955x1841 (JPEG 2000)", [CHEST], "chest_xray", ["SEG", "SR"], args.repeat)
    case("CR chest 1955x1841 (JPEG 2000)", [CHEST], "chest_xray", ["SEG", "SR", "SC"], args.repeat)


if __name__ == "__main__":
    main()
