"""Receive under load: 1, 2, 5, 10, 20 senders at once, each over its own association with its own study, against
dicom-node (SQLite and PostgreSQL job database) and Orthanc, side by side in one run.

    .venv/bin/python -m bench.receive_load [--senders 1 2 5 10 20] [--total 600]
        [--receivers node-sqlite node-postgresql orthanc] [--sender storescu|pynetdicom]

At each point every sender sends ``--total / senders`` MR instances of one study (256x256 16-bit, the Siemens T1
slices with new UIDs) over one association. Senders are DCMTK ``/usr/bin/storescu`` processes, as modalities would
be; the latency of every C-STORE is taken from storescu's own log lines ("Sending Store Request" to "Received Store
Response"), time-stamped as they arrive. ``--sender pynetdicom`` uses Python senders instead (heavier on the CPU the
receivers share). Reports per receiver and point: instances stored, aggregate instances/s (all instances / wall
time), p50 and p99 latency per instance, failures, and the receiver's peak RSS (VmHWM, summed over its processes).
dicom-node runs as ``dicom-node serve`` with its defaults (fsync, completion monitor; ``max_associations`` 32 for the
20-sender point) and without embedded workers (``node-sqlite-x1`` / ``-x4``: 1 or 4 receiving processes),
so the figure is the receive path's; Orthanc with its defaults and no plugins. Each receiver is started once and
receives every point (new UIDs at every point).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.receive import REPO, SIEMENS, Receiver, dicom_node, free_port, orthanc, peak_rss_kib, wait_port

POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@contextmanager
def bare_pynetdicom(work: Path, processes: int = 1) -> Iterator[Receiver]:
    """bench/receive_bare_scp.py: pynetdicom's chunked receive and nothing else (no parse, fsync or database)."""
    port = free_port()
    command = [str(REPO / ".venv" / "bin" / "python"), "-m", "bench.receive_bare_scp", str(port), str(processes)]
    process = subprocess.Popen(command)
    try:
        wait_port(port, process)
        yield Receiver("pynetdicom" if processes == 1 else f"pynetdicom-x{processes}", "BARE", port, process)
    finally:
        process.terminate()
        process.wait(60)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# Room for the 20-sender point (the node's default allows 16 associations at once; Orthanc has no limit by default).
NETWORK = {"max_associations": 32}


@contextmanager
def node_sqlite(work: Path, processes: int | None = None) -> Iterator[Receiver]:
    network = NETWORK if processes is None else {**NETWORK, "receive_processes": processes}
    with dicom_node(work, {"network": network}) as receiver:
        name = "node-sqlite" if processes is None else f"node-sqlite-x{processes}"
        yield Receiver(name, receiver.ae_title, receiver.port, receiver.process)


@contextmanager
def node_postgresql(work: Path) -> Iterator[Receiver]:
    with postgres_database() as url, dicom_node(work, {"database": {"url": url}, "network": NETWORK}) as receiver:
        yield Receiver("node-postgresql", receiver.ae_title, receiver.port, receiver.process)


RECEIVERS: dict[str, Callable[[Path], AbstractContextManager[Receiver]]] = {
    "node-sqlite": node_sqlite,
    "node-postgresql": node_postgresql,
    "node-sqlite-x1": lambda work: node_sqlite(work, 1),
    "node-sqlite-x4": lambda work: node_sqlite(work, 4),
    "orthanc": orthanc,
    "pynetdicom": bare_pynetdicom,
    "pynetdicom-x2": lambda work: bare_pynetdicom(work, 2),
    "pynetdicom-x4": lambda work: bare_pynetdicom(work, 4),
}


def make_study_files(out: Path, count: int) -> list[Path]:
    """One study of ``count`` MR instances with new UIDs, from the Siemens slices."""
    sources = sorted(SIEMENS.iterdir())
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(count):
        ds = dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send_storescu(port: int, ae_title: str, calling: str, files: list[Path]) -> tuple[list[float], int]:
    """DCMTK storescu over one association; each C-STORE timed from its request log line to its response line."""
    process = subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aet", calling, "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert process.stderr is not None
    latencies, successes, sent_at = [], 0, 0.0
    for line in process.stderr:
        now = time.perf_counter()
        if "Sending Store Request" in line:
            sent_at = now
        elif "Received Store Response" in line:
            latencies.append(now - sent_at)
            successes += "(Success)" in line
    process.wait()
    return latencies, len(files) - successes


def send_pynetdicom(port: int, ae_title: str, calling: str, files: list[Path]) -> tuple[list[float], int]:
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return [], len(files)
    latencies, failures = [], 0
    for path in files:
        start = time.perf_counter()
        status = assoc.send_c_store(path)
        latencies.append(time.perf_counter() - start)
        failures += not status or int(status.Status) != 0
    assoc.release()
    return latencies, failures


SENDERS = {"storescu": send_storescu, "pynetdicom": send_pynetdicom}


def _in_process(args: tuple[str, int, str, str, list[Path]]) -> tuple[list[float], int]:
    sender, *rest = args
    return SENDERS[sender](*rest)  # type: ignore[arg-type]


def run_point(receiver: Receiver, studies: list[list[Path]], sender: str) -> dict[str, float]:
    """All senders at once; storescu senders are driven from threads (they are processes of their own), Python
    senders run in processes."""
    args = [(sender, receiver.port, receiver.ae_title, f"LOAD{i:02d}", files) for i, files in enumerate(studies)]
    results: list[tuple[list[float], int]] = [([], 0)] * len(args)
    start = time.perf_counter()
    if sender == "storescu":

        def run(i: int) -> None:
            results[i] = _in_process(args[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(len(args)) as pool:
            results = pool.map(_in_process, args)
    wall = time.perf_counter() - start
    latencies = sorted(latency for lat, _ in results for latency in lat) or [0.0]
    failures = sum(f for _, f in results)
    total = sum(len(s) for s in studies)
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
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--total", type=int, default=600, help="instances per point, split among the senders")
    parser.add_argument(
        "--receivers", nargs="+", choices=list(RECEIVERS), default=["node-sqlite", "node-postgresql", "orthanc"]
    )
    parser.add_argument("--sender", choices=list(SENDERS), default="storescu")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-receive-load-"))
    rows: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for name in args.receivers:
            with RECEIVERS[name](work / name) as receiver:
                warm = make_study_files(work / f"in-{name}-warm", 2)
                _in_process((args.sender, receiver.port, receiver.ae_title, "WARM", warm))
                for senders in args.senders:
                    # New UIDs at every point, so no receiver sees another point's studies as duplicates.
                    inputs = work / f"in-{name}-{senders}"
                    per_sender = max(1, args.total // senders)
                    studies = [make_study_files(inputs / f"s{i:02d}", per_sender) for i in range(senders)]
                    rows[(receiver.name, senders)] = run_point(receiver, studies, args.sender)
                    shutil.rmtree(inputs)
                    row = rows[(receiver.name, senders)]
                    print(f"  {receiver.name} {senders} senders: {row['inst_per_s']:.1f} inst/s", file=sys.stderr)
        names = list(dict.fromkeys(name for name, _ in rows))
        print(
            f"{args.sender} senders, {args.total} MR instances (256x256 16-bit) per point, one study per sender\n"
            f"{'receiver':<16} {'senders':>7} {'stored':>7} {'failed':>7} {'inst/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'peak RSS':>9} {'vs Orthanc':>10}"
        )
        for name in names:
            for senders in args.senders:
                row = rows[(name, senders)]
                orthanc_row = rows.get(("Orthanc", senders))
                ratio = f"{row['inst_per_s'] / orthanc_row['inst_per_s']:.2f}x" if orthanc_row else ""
                print(
                    f"{name:<16} {senders:7d} {row['instances']:7.0f} {row['failures']:7.0f} {row['inst_per_s']:8.1f} "
                    f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['peak_rss_mib']:5.0f} MiB {ratio:>10}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
