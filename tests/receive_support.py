"""Helpers for the receive tests: a real ``dicom-node serve`` subprocess, DCMTK peers, waiting on the job database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from conftest import REPO, free_port, port_open
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select

from dicom_node.db import Database, Job, JobState

DICOM_NODE = REPO / ".venv" / "bin" / "dicom-node"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
AE_TITLE = "DICOMNODE"

# storescu proposes uncompressed transfer syntaxes unless told; one option per encoded transfer syntax.
STORESCU_PROPOSAL = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {probe}")
        time.sleep(interval)


def newest_job_finished(db: Database, timeout: float) -> Job:
    """The newest job once it is final (delivered, delivery failed or failed), detached from its session."""

    def probe() -> Job | None:
        with db.session() as session:
            job = session.scalar(select(Job).order_by(Job.id.desc()))
            if job is None:
                return None
            session.expunge(job)
            done = (JobState.DELIVERED, JobState.DELIVERY_FAILED, JobState.FAILED)
            return job if job.state in done else None

    return wait_for(probe, timeout)


@dataclass
class NodeProcess:
    """``dicom-node serve`` in a subprocess with its own data directory and port."""

    data_dir: Path
    database_url: str
    settings: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def write_config(self) -> None:
        config: dict[str, Any] = {
            "node": {
                "ae_title": AE_TITLE,
                "port": self.port,
                "data_dir": str(self.data_dir),
                "bind_address": "127.0.0.1",
            },
            "database": {"url": self.database_url},
            "storage": {"min_free_bytes": 0},
            "completion": {"quiet_seconds": 2.0, "check_interval_seconds": 0.2},
            "http": {"port": 0},
            "workers": {"embedded": False},
        }
        for section, values in self.settings.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> NodeProcess:
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(DICOM_NODE), "serve", "--config", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 60
        while not port_open(self.port):
            if self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node did not listen:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def storescu(
    port: int, paths: Iterable[Path], calling: str = "MODALITY", called: str = AE_TITLE, extra: Iterable[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu, proposing each file's own transfer syntax."""
    files = [Path(p) for p in paths]
    options: list[str] = []
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files if f.is_file()}
    if len(syntaxes) == 1:
        options.append(STORESCU_PROPOSAL.get(syntaxes.pop(), "-xe"))  # type: ignore[call-overload]
    command = [STORESCU, "-aet", calling, "-aec", called, *options, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "LANG": "C"})


def echoscu(port: int, calling: str = "ECHOSCU", called: str = AE_TITLE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "-aet", calling, "-aec", called, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
    )
