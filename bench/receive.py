"""Receive benchmark: DCMTK storescu over ONE association against dicom-node, Orthanc and DCMTK storescp.

    .venv/bin/python -m bench.receive [--mr 300] [--cxr 20] [--rss-instances 100] [--skip-rss]

(a) MR: 256x256 16-bit instances made from the Siemens T1 series with new UIDs; (b) CXR: 2048x2048 16-bit
synthetic instances. Reports instances/s and MB/s per receiver and the ratios. Then the node's peak RSS (VmHWM)
while it receives a ~2 GB study of 20 MB instances. dicom-node runs with durability and bookkeeping on (fsync,
SQLite job database, completion monitor), as ``dicom-node serve`` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SIEMENS = REPO.parent / "shared" / "data" / "dicom" / "mr_brain_t1_siemens"
CHEST = REPO.parent / "shared" / "data" / "dicom" / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"
DICOM_NODE = REPO / ".venv" / "bin" / "dicom-node"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def make_mr(out: Path, count: int) -> list[Path]:
    sources = sorted(SIEMENS.iterdir())
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        paths.append(out / f"mr{i:04d}.dcm")
        ds.save_as(paths[-1])
    return paths


def make_xray(out: Path, count: int, size: int, prefix: str) -> list[Path]:
    """Synthetic 16-bit DX-like instances (header from the real CR chest, uncompressed pixel data)."""
    template = dcmread(CHEST, stop_before_pixels=True)
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 4096, size=(size, size), dtype=np.uint16)).tobytes()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = template.copy()
        ds.file_meta = FileMetaDataset(template.file_meta)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel = 1
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        paths.append(out / f"{prefix}{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@dataclass
class Receiver:
    name: str
    ae_title: str
    port: int
    process: subprocess.Popen[bytes]
    rest_url: str | None = None  # Orthanc's REST API (loopback, no authentication)


@contextmanager
def dicom_node(work: Path, sections: dict[str, dict[str, Any]] | None = None) -> Iterator[Receiver]:
    """``dicom-node serve`` with the bench's configuration; ``sections`` add to (or replace keys of) its sections."""
    port = free_port()
    data = work / "node"
    data.mkdir(parents=True)
    settings: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "DICOMNODE", "port": port, "data_dir": str(data), "bind_address": "127.0.0.1"},
        "storage": {"min_free_bytes": 100_000_000},
        "completion": {"quiet_seconds": 30},
        "http": {"port": 0},
        "workers": {"embedded": False},
        "logging": {"level": "WARNING"},
    }
    for section, values in (sections or {}).items():
        settings.setdefault(section, {}).update(values)
    config = data / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    process = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process)
        yield Receiver("dicom-node", "DICOMNODE", port, process)
    finally:
        process.terminate()
        process.wait(60)


@contextmanager
def orthanc(work: Path) -> Iterator[Receiver]:
    port, http = free_port(), free_port()
    data = work / "orthanc"
    data.mkdir(parents=True)
    config = data / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(data / "storage"),
                "IndexDirectory": str(data / "index"),
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": http,
                "HttpServerEnabled": True,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "StorageCompression": False,
                "Plugins": [],
            }
        )
    )
    process = subprocess.Popen(["/usr/sbin/Orthanc", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process)
        wait_port(http, process)
        yield Receiver("Orthanc", "ORTHANC", port, process, f"http://127.0.0.1:{http}")
    finally:
        process.terminate()
        process.wait(60)


@contextmanager
def storescp(work: Path) -> Iterator[Receiver]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, process)
        yield Receiver("DCMTK storescp", "STORESCP", port, process)
    finally:
        process.terminate()
        process.wait(60)


def send(receiver: Receiver, files: list[Path]) -> float:
    """Seconds storescu takes to send ``files`` over one association."""
    start = time.perf_counter()
    result = subprocess.run(
        [
            "/usr/bin/storescu",
            "-aet",
            "BENCH",
            "-aec",
            receiver.ae_title,
            "127.0.0.1",
            str(receiver.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {receiver.name} failed: {result.stderr[-500:]}")
    return elapsed


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process and its descendants, summed (the node receives in several processes)."""
    total = 0
    for member in [pid, *_descendants(pid)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = [int(c) for c in children]
    for child in list(found):
        found.extend(_descendants(child))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mr", type=int, default=300)
    parser.add_argument("--cxr", type=int, default=20)
    parser.add_argument("--rss-instances", type=int, default=100, help="20 MB instances for the peak RSS run")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        inputs = work / "inputs"
        inputs.mkdir()
        workloads = {
            f"(a) MR {args.mr} x 256x256 16-bit": make_mr(inputs, args.mr),
            f"(b) CXR {args.cxr} x 2048x2048 16-bit": make_xray(inputs, args.cxr, 2048, "cxr"),
        }
        results: dict[str, dict[str, tuple[float, float]]] = {}
        for name, files in workloads.items():
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            results[name] = {}
            for make in (dicom_node, orthanc, storescp):
                run_dir = Path(tempfile.mkdtemp(dir=work))
                with make(run_dir) as receiver:
                    send(receiver, files[:2])  # warm-up association (caches, first-use costs)
                    seconds = send(receiver, files)
                    results[name][receiver.name] = (len(files) / seconds, megabytes / seconds)
                shutil.rmtree(run_dir)
        print(f"{'workload':<32} {'receiver':<16} {'inst/s':>8} {'MB/s':>8} {'node ratio':>11}")
        for name, by_receiver in results.items():
            node_rate = by_receiver["dicom-node"][0]
            for receiver_name, (rate, mbps) in by_receiver.items():
                ratio = node_rate / rate
                print(f"{name:<32} {receiver_name:<16} {rate:8.1f} {mbps:8.1f} {ratio:10.2f}x")
        shutil.rmtree(inputs)

        if not args.skip_rss:
            inputs.mkdir()
            big = make_xray(inputs, args.rss_instances, 3200, "big")
            total = sum(f.stat().st_size for f in big) / 1e9
            run_dir = Path(tempfile.mkdtemp(dir=work))
            with dicom_node(run_dir) as receiver:
                idle = peak_rss_kib(receiver.process.pid)
                seconds = send(receiver, big)
                peak = peak_rss_kib(receiver.process.pid)
            print(
                f"peak RSS of dicom-node receiving {len(big)} instances, {total:.2f} GB in {seconds:.1f} s "
                f"({total * 1000 / seconds:.0f} MB/s): {peak / 1024:.0f} MiB (after start-up {idle / 1024:.0f} MiB)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
