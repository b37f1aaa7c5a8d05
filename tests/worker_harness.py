"""Real brokers and real worker processes for the worker tests.

* ``RedisServer``: a private ``redis-server`` on a free port without persistence, which a test may stop and start
  again (the shared Redis on 6379 is never touched).
* ``Node``: settings, job database, Celery app, scheduler and sweeper as ``dicom-node serve`` would hold them.
* ``Node.start_worker``: ``.venv/bin/dicom-node worker ...`` as a subprocess, with the test-only detector of
  tests/plugins installed through the ``dicom_node.detectors`` entry point group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO, free_port, port_open
from sqlalchemy import select

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, JobEvent, WorkerHeartbeat
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.jobs.sweeper import Sweeper
from dicom_node.workers.app import CeleryDispatcher, create_app
from dicom_node.workers.inspect import inspector_for
from dicom_node.workers.versions import model_card_versions

DICOM_NODE = Path(sys.executable).parent / "dicom-node"
PLUGINS = REPO / "tests" / "plugins"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: port_open(self.port), 10, "redis-server to listen")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def install_plugin(directory: Path) -> str:
    """A throw-away distribution whose entry points register the test detector; returns a PYTHONPATH."""
    dist = directory / "dicom_node_test_detectors-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dicom-node-test-detectors\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[dicom_node.detectors]\nbrain_mri = dn_test_detectors:load_brain\nchest_xray = dn_test_detectors:load_chest\n"
    )
    return os.pathsep.join([str(directory), str(PLUGINS)])


class Worker:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, hostname: str) -> None:
        self.process = process
        self.log = log
        self.hostname = hostname

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """kill -9 the worker's main process and its pool children."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Warm shutdown: SIGTERM to the main process only (it stops its pool after the running jobs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Node:
    """What the node process holds: settings, database, dispatcher, scheduler, sweeper."""

    def __init__(self, tmp_path: Path, database_url: str, broker_url: str | None, **workers: Any) -> None:
        self.tmp_path = tmp_path
        self.model_dir = tmp_path / "model"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        (self.model_dir / "model_card.json").write_text(json.dumps({"version": "test-1"}))
        self.behaviour: dict[str, dict[str, Any]] = {}
        destinations = workers.pop("destinations", [])
        detector = {
            "model_dir": str(self.model_dir),
            "soft_time_limit_seconds": workers.pop("soft_time_limit_seconds", 60),
            "time_limit_seconds": workers.pop("time_limit_seconds", 90),
            "batch_size": 2,
        }
        config: dict[str, Any] = {
            "node": {"data_dir": str(tmp_path / "data")},
            "database": {"url": database_url},
            "broker": {"url": broker_url},
            "detectors": {"brain_mri": detector, "chest_xray": dict(detector)},
            "workers": {
                "lease_seconds": 60,  # the last resort: heartbeats decide
                "requeue_after_seconds": 4,
                "sweep_interval_seconds": 0.5,
                "heartbeat_seconds": 0.5,
                "failover_grace_seconds": 4,  # silent 3.5 s: dead (room for a busy SQLite on 2 cores)
                **workers,
            },
            "destinations": destinations,
            "logging": {"level": "INFO"},
        }
        self.config_path = tmp_path / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.settings: Settings = load_settings(self.config_path)
        self.db = Database(self.settings.database_url)
        self.app = create_app(self.settings)
        self.dispatcher = CeleryDispatcher(self.app, self.settings)
        versions = model_card_versions(self.settings)
        self.scheduler = JobScheduler(self.db, self.settings, self.dispatcher, model_version=versions)
        self.sweeper = Sweeper(
            self.db,
            self.settings,
            self.dispatcher,
            model_version=versions,
            inspector=inspector_for(self.app.conf.broker_url),
        )
        self.pythonpath = install_plugin(tmp_path / "plugin")
        self.workers: list[Worker] = []

    def set_behaviour(self, series_uid: str, **action: Any) -> None:
        self.behaviour[series_uid] = action
        # Atomically: a worker may be reading it for another job right now.
        tmp = self.model_dir / "behaviour.json.tmp"
        tmp.write_text(json.dumps(self.behaviour))
        tmp.replace(self.model_dir / "behaviour.json")

    def started(self, series_uid: str) -> list[int]:
        """Pids of the processes that began scoring the series."""
        return [int(path.suffix[1:]) for path in (self.model_dir / "started").glob(f"{series_uid}.*")]

    def start_worker(
        self, hostname: str, *, concurrency: int = 1, wait: bool = True, queues: str = "brain_mri"
    ) -> Worker:
        log = self.tmp_path / f"worker-{hostname.replace('@', '_')}.log"
        env = {**os.environ, "PYTHONPATH": self.pythonpath}
        command = [
            str(DICOM_NODE), "worker", "--config", str(self.config_path), "--queues", queues, "--device", "cpu",
            "--concurrency", str(concurrency), "--hostname", hostname, "--loglevel", "INFO",
        ]  # fmt: skip
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        worker = Worker(process, log, hostname)
        self.workers.append(worker)
        if wait:
            wait_for(lambda: "ready." in worker.output() or process.poll() is not None, 90, f"worker {hostname}")
            assert process.poll() is None, worker.output()
        return worker

    def jobs(self) -> list[Job]:
        with self.db.session() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.id)))
            session.expunge_all()
            return jobs

    def job(self, job_id: int) -> Job:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def events(self, job_id: int) -> list[str]:
        with self.db.session() as session:
            return list(session.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def wait_states(self, job_ids: list[int], states: set[str], timeout: float, sweep: bool = False) -> list[Job]:
        def done() -> list[Job] | None:
            if sweep:
                self.sweeper.sweep_once()
            jobs = [self.job(job_id) for job_id in job_ids]
            return jobs if all(job.state.value in states for job in jobs) else None

        try:
            return wait_for(done, timeout, f"jobs {job_ids} to reach {sorted(states)}", interval=0.5)  # type: ignore[no-any-return]
        except AssertionError:
            for worker in self.workers:
                print(f"--- {worker.hostname}\n{worker.output()[-6000:]}")
            print([(job.id, job.state, job.worker, job.error) for job in self.jobs()])
            raise

    def event_details(self, job_id: int) -> list[str]:
        with self.db.session() as session:
            details = session.scalars(select(JobEvent.detail).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [detail or "" for detail in details]

    def heartbeat_holding(self, worker: str, job_id: int) -> bool:
        """Whether the worker's latest heartbeat lists a message of the job."""
        with self.db.session() as session:
            row = session.get(WorkerHeartbeat, worker)
            return row is not None and any(item.get("job") == job_id for item in json.loads(row.held or "[]"))

    def result_dirs(self) -> list[Path]:
        return sorted(path for path in self.settings.results_dir.glob("job-*") if path.is_dir())

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.app.close()
        self.db.dispose()
