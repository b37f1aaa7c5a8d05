"""Queueing overhead: ``python -m bench.workers [--studies 60] [--broker redis|embedded|both]``.

Measures the time from "study complete" (``JobScheduler.on_study_complete`` called, as the completion monitor does
after committing) to "task started" (the worker took the job's lease: ``Job.started_at``), one study at a time so
that no job waits behind another. That is the node's own overhead: scheduling (model card, result key, job row,
commit), publishing, broker delivery, the worker's lease. It uses a real worker process (``dicom-node worker``,
prefork, concurrency 1) with the test-only intensity detector of tests/plugins, so detection time does not enter
the figures. Redis runs as a private ``redis-server`` on a free port. Results go to docs/benchmarks.md by hand.

``--real brain_mri`` (or ``chest_xray``) instead measures throughput with the shipped detector: each study is the
real series from ../shared/data/dicom (the 176-slice Siemens T1, or the CR chest), jobs run one after another on
one CPU worker process, and jobs/hour = 3600 / mean(finished_at - started_at).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import yaml
from celery import Celery
from pydicom.uid import generate_uid

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Instance, Job, Series, Study, StudyState
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.timeutil import utc
from dicom_node.workers.app import CeleryDispatcher, create_app
from dicom_node.workers.versions import model_card_versions

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO.parent / "shared" / "data" / "dicom"
MR_FILE = DICOM / "mr_brain_t1_siemens" / "00001.dcm"
REAL_SERIES = {
    "brain_mri": sorted((DICOM / "mr_brain_t1_siemens").glob("*.dcm")),
    "chest_xray": [DICOM / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"],
}
PLUGINS = REPO / "tests" / "plugins"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(condition: Any, timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def plugin_path(directory: Path) -> str:
    dist = directory / "dicom_node_test_detectors-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dicom-node-test-detectors\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[dicom_node.detectors]\nbrain_mri = dn_test_detectors:load_brain\n")
    return os.pathsep.join([str(directory), str(PLUGINS)])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A private ``redis-server`` on a free loopback port, nothing persisted: (process, broker URL)."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    return process, f"redis://127.0.0.1:{port}/0"


@dataclass
class JobSide:
    """The job side of the node as ``dicom-node serve`` wires it, for a bench that starts its own worker."""

    config_path: Path
    settings: Settings
    db: Database
    app: Celery
    scheduler: JobScheduler

    def close(self) -> None:
        self.app.close()
        self.db.dispose()


def job_side(workdir: Path, config: dict[str, Any]) -> JobSide:
    """Write ``config`` to ``workdir/node.yaml`` (the worker reads the same file) and build the job database, the
    Celery app and the scheduler on it."""
    config_path = workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    db = Database(settings.database_url)
    app = create_app(settings)
    scheduler = JobScheduler(db, settings, CeleryDispatcher(app, settings), model_version=model_card_versions(settings))
    return JobSide(config_path, settings, db, app, scheduler)


def make_study(db: Database, files: list[Path], detector: str = "brain_mri") -> int:
    now = datetime.now(UTC)
    with db.session() as session:
        study = Study(study_instance_uid=generate_uid(), state=StudyState.COMPLETE, completed_at=now)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid(), detector=detector)
        session.add(series)
        session.flush()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=generate_uid(),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    file_path=str(path),
                    size_bytes=path.stat().st_size,
                )
            )
        return int(study.id)


def run(broker: str, studies: int, workdir: Path, real: str | None = None) -> dict[str, float]:
    redis, url = start_redis() if broker == "redis" else (None, None)
    detector = real or "brain_mri"
    config: dict[str, Any] = {
        "node": {"data_dir": str(workdir / "data")},
        "broker": {"url": url},
        "logging": {"level": "WARNING"},
    }
    if real is None:  # the test-only detector: overhead only
        model_dir = workdir / "model"
        model_dir.mkdir(parents=True)
        (model_dir / "model_card.json").write_text(json.dumps({"version": "bench"}))
        config["detectors"] = {"brain_mri": {"model_dir": str(model_dir)}}
    side = job_side(workdir, config)
    db, scheduler, config_path = side.db, side.scheduler, side.config_path
    env = {**os.environ, "PYTHONPATH": plugin_path(workdir / "plugin")} if real is None else dict(os.environ)
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "dicom-node"), "worker", "--config", str(config_path), "--queues",
         detector, "--device", "cpu", "--concurrency", "1", "--hostname", f"bench-{broker}@%h"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    files = REAL_SERIES[detector] if real else [MR_FILE]
    overheads: list[float] = []
    durations: list[float] = []
    schedule_times: list[float] = []
    try:
        for index in range(studies + 1):  # the first one warms up the worker (detector load) and is not counted
            study_id = make_study(db, files, detector)
            t0 = datetime.now(UTC)
            start = time.perf_counter()
            (job_id,) = scheduler.on_study_complete(study_id)
            scheduled = time.perf_counter() - start

            def started(job_id: int = job_id) -> datetime | None:
                with db.session() as session:
                    job = session.get(Job, job_id)
                    return job.started_at if job is not None else None

            started_at = wait(started, 120, f"job {job_id} to start")
            finished_at = wait(lambda job_id=job_id: _finished(db, job_id), 1800, f"job {job_id} to finish", 0.05)
            if index:
                durations.append((utc(finished_at) - utc(started_at)).total_seconds())
                overheads.append((utc(started_at) - t0).total_seconds() * 1000)
                schedule_times.append(scheduled * 1000)
    finally:
        worker.terminate()
        worker.wait(30)
        if redis is not None:
            redis.kill()
            redis.wait()
        side.close()
    quantiles = statistics.quantiles(overheads, n=20, method="inclusive")
    return {
        "n": len(overheads),
        "p50_ms": statistics.median(overheads),
        "p95_ms": quantiles[18],
        "max_ms": max(overheads),
        "schedule_p50_ms": statistics.median(schedule_times),
        "job_mean_s": statistics.mean(durations),
    }


def _finished(db: Database, job_id: int) -> datetime | None:
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.finished_at is not None and job.state.value != "succeeded":
            raise SystemExit(f"job {job_id} {job.state.value}: {job.error}")
        return job.finished_at if job is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--broker", choices=["redis", "embedded", "both"], default="both")
    parser.add_argument("--real", choices=sorted(REAL_SERIES), help="throughput with this shipped detector")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for broker in ["redis", "embedded"] if args.broker == "both" else [args.broker]:
        with tempfile.TemporaryDirectory(prefix=f"bench-workers-{broker}-") as tmp:
            result = run(broker, args.studies, Path(tmp), args.real)
        if args.real:
            slices = len(REAL_SERIES[args.real])
            print(
                f"{args.real} on 1 CPU worker process ({slices} images per study): {result['job_mean_s']:.2f} s per "
                f"job, {3600 / result['job_mean_s']:.0f} jobs/hour (n={result['n']:.0f}, {broker} broker)"
            )
            continue
        print(
            f"{broker:9s} n={result['n']:.0f}  complete→started p50 {result['p50_ms']:.1f} ms  "
            f"p95 {result['p95_ms']:.1f} ms  max {result['max_ms']:.1f} ms  "
            f"(scheduling itself p50 {result['schedule_p50_ms']:.1f} ms)"
        )


if __name__ == "__main__":
    main()
