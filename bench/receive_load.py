"""Receive under load: N senders at once, each over its own association, against dicom-node and Orthanc in one run.

    .venv/bin/python -m bench.receive_load [--senders 10] [--instances 300] [--per-study 10]

Each sender (a separate process running pynetdicom, sending the files' bytes as they are) sends ``--instances``
MR instances (256x256 16-bit, the Siemens T1 slices with new UIDs, ``--per-study`` instances per study) over one
association and times every C-STORE from request to response. Reports per receiver: instances stored, aggregate
instances/s (all instances / wall time), p50 and p99 latency per instance, failures, and the receiver's peak RSS
(VmHWM). dicom-node runs as ``dicom-node serve`` with its defaults (fsync, SQLite job database, completion monitor)
and without embedded workers, so the figure is the receive path's; Orthanc with its defaults and no plugins.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.receive import REPO, SIEMENS, Receiver, dicom_node, free_port, orthanc, peak_rss_kib, wait_port


@contextmanager
def bare_pynetdicom(work: Path) -> Iterator[Receiver]:
    """bench/receive_bare_scp.py: pynetdicom's chunked receive and nothing else (no parse, fsync or database)."""
    port = free_port()
    process = subprocess.Popen([str(REPO / ".venv" / "bin" / "python"), "-m", "bench.receive_bare_scp", str(port)])
    try:
        wait_port(port, process)
        yield Receiver("pynetdicom", "BARE", port, process)
    finally:
        process.terminate()
        process.wait(60)


def make_sender_files(out: Path, sender: int, count: int, per_study: int) -> list[Path]:
    sources = sorted(SIEMENS.iterdir())
    folder = out / f"sender{sender:02d}"
    folder.mkdir(parents=True)
    files = []
    study_uid = series_uid = ""
    for i in range(count):
        if i % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        ds = dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per_study + 1
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send_timed(receiver_port: int, ae_title: str, files: list[Path]) -> tuple[list[float], int]:
    """One association; the latency of each C-STORE and how many did not get Success."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="LOAD")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver_port, ae_title=ae_title)
    if not assoc.is_established:
        return [], len(files)
    latencies, failures = [], 0
    for path in files:
        start = time.perf_counter()
        status = assoc.send_c_store(path)
        latencies.append(time.perf_counter() - start)
        if not status or int(status.Status) != 0:
            failures += 1
    assoc.release()
    return latencies, failures


def _sender(args: tuple[int, str, list[Path]]) -> tuple[list[float], int]:
    return send_timed(*args)


def run_load(receiver: Receiver, batches: list[list[Path]]) -> dict[str, float]:
    with multiprocessing.get_context("fork").Pool(len(batches)) as pool:
        start = time.perf_counter()
        results = pool.map(_sender, [(receiver.port, receiver.ae_title, files) for files in batches])
        wall = time.perf_counter() - start
    latencies = sorted(latency for lat, _ in results for latency in lat)
    failures = sum(f for _, f in results)
    total = sum(len(b) for b in batches)
    return {
        "instances": total - failures,
        "failures": failures,
        "wall_s": wall,
        "inst_per_s": (total - failures) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "peak_rss_mib": peak_rss_kib(receiver.process.pid) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--instances", type=int, default=300, help="per sender")
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument(
        "--receivers", nargs="+", choices=["dicom-node", "orthanc", "pynetdicom"], default=["dicom-node", "orthanc"]
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-receive-load-"))
    try:
        rows = {}
        makers = {"dicom-node": dicom_node, "orthanc": orthanc, "pynetdicom": bare_pynetdicom}
        for make in (makers[name] for name in args.receivers):
            # New UIDs for every receiver, so neither sees the other's studies as duplicates.
            inputs = work / f"inputs-{make.__name__}"
            batches = [make_sender_files(inputs, s, args.instances, args.per_study) for s in range(args.senders)]
            run_dir = Path(tempfile.mkdtemp(dir=work))
            with make(run_dir) as receiver:
                send_timed(receiver.port, receiver.ae_title, batches[0][:2])  # warm-up (first-use costs)
                rows[receiver.name] = run_load(receiver, [b[2:] if i == 0 else b for i, b in enumerate(batches)])
            shutil.rmtree(run_dir)
            shutil.rmtree(inputs)
        print(
            f"{args.senders} senders x {args.instances} instances (256x256 16-bit MR, {args.per_study} per study)\n"
            f"{'receiver':<12} {'stored':>7} {'failed':>7} {'inst/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS':>9}"
        )
        for name, row in rows.items():
            print(
                f"{name:<12} {row['instances']:7.0f} {row['failures']:7.0f} {row['inst_per_s']:8.1f} "
                f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['peak_rss_mib']:7.0f} MiB"
            )
        if {"dicom-node", "Orthanc"} <= set(rows):
            print(f"node / Orthanc: {rows['dicom-node']['inst_per_s'] / rows['Orthanc']['inst_per_s']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
