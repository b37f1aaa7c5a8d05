"""Start a Celery worker process for dicom-node (``dicom-node worker``) and the embedded workers of ``serve``."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from dicom_node.config import Settings
from dicom_node.db import migrate
from dicom_node.lifetime import die_with_parent
from dicom_node.workers.app import create_app, default_queues, deliveries_first, queue_detectors
from dicom_node.workers.broker import is_embedded, prepare_embedded_broker
from dicom_node.workers.context import get_context, set_cpu_threads
from dicom_node.workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)


def gpu_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def plan_concurrency(settings: Settings, device: str, concurrency: int | None) -> int:
    """One pool process per GPU with ``auto``/``cuda`` (when there are GPUs); ``workers.concurrency`` otherwise."""
    if concurrency is not None:
        return concurrency
    if device in ("auto", "cuda"):
        gpus = gpu_count()
        if gpus:
            return gpus
    return settings.workers.concurrency


def _preload(app: Celery, queues: Sequence[str]) -> None:
    """Load the detectors of this worker's queues as soon as the pool process starts (kept warm after that); on
    CPU, share the CPUs out among the pool processes (torch threads, ``workers.context.cpu_threads``)."""
    context = get_context(app)
    detectors = queue_detectors(queues)
    for name in detectors:
        try:
            context.detector(name)
        except Exception:  # the job itself will fail with the reason; the process must stay up
            log.exception("could not load detector %s", name)
    # Only where a detector brought torch in: a delivery-only worker (or a detector without torch) needs none.
    if context.loaded_on_cpu() and "torch" in sys.modules:
        threads = set_cpu_threads(int(app.conf.get("dicom_node_processes") or 1))
        import torch

        log.info(
            "torch threads %d in this pool process (%s)",
            torch.get_num_threads(),
            "OMP_NUM_THREADS" if threads is None else "the CPUs shared out among the pool processes",
        )


def build_worker_app(
    settings: Settings, *, broker: str | None, device: str, queues: Sequence[str], processes: int = 1
) -> Celery:
    app = create_app(settings, broker=broker)
    app.conf.dicom_node_device = device
    app.conf.dicom_node_processes = processes
    migrate(settings.database_url)  # once, before the pool forks; the pool processes never migrate
    if is_embedded(app.conf.broker_url):
        prepare_embedded_broker(app.conf.broker_url)

    def on_process_init(**_: Any) -> None:
        _preload(app, queues)

    worker_process_init.connect(on_process_init, weak=False)
    app.steps["worker"].add(Heartbeat)
    return app


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    device: str | None = None,
    concurrency: int | None = None,
    broker: str | None = None,
    hostname: str | None = None,
    loglevel: str | None = None,
) -> int:
    """Run a worker in this process until it is stopped (SIGTERM: finish the running jobs, then exit)."""
    queues = deliveries_first(list(queues or default_queues(settings)))
    device = device or settings.workers.device
    processes = plan_concurrency(settings, device, concurrency)
    app = build_worker_app(settings, broker=broker, device=device, queues=queues, processes=processes)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={processes}",
        f"--hostname={hostname or 'dicom-node@' + socket.gethostname()}",
        f"--loglevel={loglevel or settings.logging.level}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
    ]
    log.info("worker: queues %s, %d process(es), device %s", ",".join(queues), processes, device)
    app.worker_main(argv)
    return 0


class EmbeddedWorkers:
    """The workers of ``dicom-node serve``: a ``dicom-node worker`` child process, stopped with the node.

    A separate process (not a thread) so that a detector crash, its memory and its time limits stay out of the
    receiving node. The child gets the node's effective settings as a file."""

    def __init__(self, settings: Settings, *, hostname: str | None = None, extra_args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.hostname = hostname or f"embedded@{socket.gethostname()}"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    def settings_file(self) -> Path:
        path = Path(self.settings.node.data_dir) / "run" / "worker-settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # It may hold destination tokens: readable by the node's user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.settings.model_dump(mode="json"), handle)
        return path

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dicom_node",
            "worker",
            "--config",
            str(self.settings_file()),
            "--hostname",
            self.hostname,
            *self.extra_args,
        ]

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own executable
            self.command(), env=os.environ.copy(), preexec_fn=die_with_parent(os.getpid())
        )
        log.info("embedded workers started (pid %d)", self.process.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM lets running jobs finish), then SIGKILL after ``timeout``; the sweeper re-queues
        whatever was cut short."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded workers did not stop in %.0f s; killing them", timeout)
            self.process.kill()
            self.process.wait()
        self.process = None
