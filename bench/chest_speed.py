"""Chest X-ray detector speed: one radiograph from a DICOM file to scores, anomaly map and regions.

Usage:
    .venv/bin/python bench/chest_speed.py [--model DIR] [--device cpu|cuda] [--repeat 5]

Times (median of ``--repeat`` runs after one warm-up) for:
- the real Philips CR chest PA in ../shared/data/dicom/cr (1955x1841, MONOCHROME1, JPEG 2000 lossy);
- a synthetic 2500x2000 16-bit MONOCHROME1 CR with a window (uncompressed), built from a cxr_nih PNG.
Stages: read + decode + VOI/MONOCHROME1 (``radiograph_image``), prepare + backbone + scoring + map back to the
source geometry (``score_series`` minus decoding), and ``select_regions`` (chest rules, as an Abnormal result) on the
source-size map.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.models.chest_xray.detector import radiograph_image  # noqa: E402
from dicom_node.models.regions import rules_for, select_regions  # noqa: E402
from dicom_node.models.registry import default_registry  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
REAL_CR = DATA / "dicom" / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"


def synthetic_cr(path: Path, rows: int = 2500, cols: int = 2000) -> Path:
    """A 16-bit MONOCHROME1 CR (12 bits stored) with a window, from a real cxr_nih PNG resized to rows x cols."""
    png = sorted((DATA / "cxr_nih" / "val" / "abnormal").glob("*.png"))[0]
    with Image.open(png) as img:
        grey = np.asarray(img.convert("L").resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    stored = ((1.0 - grey) * 4000 + 50).astype(np.uint16)  # MONOCHROME1: high = dark
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2050, 4000
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


CPU_SECONDS: list[float] = []


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls after a warm-up; the median process CPU time (all threads) of the same
    calls is appended to CPU_SECONDS (on a shared machine wall time mostly measures the neighbours)."""
    result = fn()  # warm-up
    times, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU_SECONDS.append(statistics.median(cpu))
    return statistics.median(times), result


def bench_file(detector: Any, path: Path, repeat: int) -> dict[str, float]:
    def read() -> np.ndarray:
        return radiograph_image(pydicom.dcmread(path))

    t_read, image = median_time(read, repeat)

    def score() -> tuple[np.ndarray, list[np.ndarray]]:
        result: tuple[np.ndarray, list[np.ndarray]] = detector.score_each([image])
        return result

    t_score, (_, maps) = median_time(score, repeat)
    spacing = (1.0, 0.2, 0.2)  # (slice, row, column) mm: about a CR's pixel

    def regions_of() -> Any:
        return select_regions(maps[:1], detector.pixel_threshold, spacing, abnormal=True, rules=rules_for("chest_xray"))

    t_regions, regions = median_time(regions_of, repeat)

    def end_to_end() -> Any:
        return detector.score_series([pydicom.dcmread(path)])

    t_total, result = median_time(end_to_end, repeat)
    return {
        "end_to_end_cpu_s": CPU_SECONDS[-1] + CPU_SECONDS[-2],
        "read_decode_s": t_read,
        "score_and_map_s": t_score,
        "regions_s": t_regions,
        "end_to_end_s": t_total + t_regions,
        "map_shape": result.anomaly_maps.shape[1:],
        "regions": len(regions),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: shipped weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one per worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = default_registry().load("chest_xray", args.model, args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print("total = DICOM read to scores, source-size map and regions (wall); cpu = process CPU time of the same")
    with tempfile.TemporaryDirectory() as tmp:
        files = {"real CR 1955x1841 J2K": REAL_CR, "synthetic CR 2500x2000 16-bit": synthetic_cr(Path(tmp) / "s.dcm")}
        print(f"{'file':<32} {'decode':>8} {'score+map':>10} {'regions':>8} {'total':>8} {'cpu':>8}  map")
        for name, path in files.items():
            r = bench_file(detector, path, args.repeat)
            print(
                f"{name:<32} {r['read_decode_s']:>7.3f}s {r['score_and_map_s']:>9.3f}s {r['regions_s']:>7.3f}s "
                f"{r['end_to_end_s']:>7.3f}s {r['end_to_end_cpu_s']:>7.3f}s  {r['map_shape']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
