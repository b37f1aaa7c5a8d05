"""Run one detection job: the plain function behind the ``dicom_node.detect`` task.

Takes the job's lease (nothing happens when the job is not ours to run), keeps it renewed while the detector works,
reads the series' instances from the spool, scores them, saves the ``SeriesResult`` to
``results_dir / f"job-{id}"`` and records the outcome. Permanent failures (the detector cannot score the series,
the time limit) fail the job with the reason; transient ones (I/O, database busy, out of memory) go back to the
queue with backoff until ``workers.max_attempts``.

Knows nothing of the task queue: the caller says which exceptions mean "the detector ran past its time limit"
(``time_limits``; the Celery task passes ``SoftTimeLimitExceeded``), so this module (and its tests) never needs Celery.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pydicom
from sqlalchemy.exc import OperationalError

from dicom_node.config import Settings
from dicom_node.db import Database
from dicom_node.delivery import handover
from dicom_node.jobs.dispatch import Dispatcher, send_delivery, send_detection
from dicom_node.jobs.leases import (
    Lease,
    TransientJobError,
    acquire_lease,
    complete_job,
    fail_job,
    renew_lease,
    retry_later,
)
from dicom_node.models.base import Detector, SeriesResult

log = logging.getLogger(__name__)

DetectorProvider = Callable[[str], Detector]


@dataclass(frozen=True)
class DetectionOutcome:
    job_id: int
    state: str  # "skipped", "succeeded", "failed", "retry", "lost"
    detail: str = ""


class LeaseKeeper:
    """Renews a lease every third of its length from a background thread while the detector runs."""

    def __init__(self, db: Database, lease: Lease, lease_seconds: float) -> None:
        self.db = db
        self.lease = lease
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-job-{lease.job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if not renew_lease(self.db, self.lease, self.lease_seconds):
                    log.warning("job %d: lease lost (superseded or taken over)", self.lease.job_id)
                    self.lost.set()
                    return
            except Exception as err:  # database briefly unreachable: try again next period
                log.warning("job %d: could not renew lease (%s)", self.lease.job_id, err)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def is_transient(err: BaseException) -> bool:
    """Errors worth another attempt; everything else is a property of the series or the model."""
    if isinstance(err, TransientJobError | OSError | OperationalError | MemoryError):
        return True
    return type(err).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError, without importing torch


class SpoolUnreadable(Exception):
    """The worker may not read the shared spool (wrong uid or permissions): no retry heals that."""


def read_series(file_paths: tuple[str, ...]) -> list[pydicom.Dataset]:
    """Read the series from the spool. A file this worker may not read fails the job at once with a reason an
    admin can act on; a missing file (the shared spool not mounted here, or briefly away) is retried."""
    datasets: list[pydicom.Dataset] = []
    for path in file_paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except PermissionError as err:
            raise SpoolUnreadable(
                f"{path}: permission denied for this worker (uid {os.getuid()} on {socket.gethostname()}); the "
                "spool (node.data_dir) must be readable by the workers' user on every host"
            ) from err
        except FileNotFoundError as err:
            raise FileNotFoundError(
                err.errno,
                f"{err.strerror} on {socket.gethostname()} (is node.data_dir shared and mounted at the same path on "
                "every host?)",
                path,
            ) from err
    return datasets


def save_result(result: SeriesResult, results_dir: Path, job_id: int) -> Path:
    """Write the result next to its final place, then swap it in, so a reader never sees half a result."""
    final = results_dir / f"job-{job_id}"
    staging = results_dir / ".staging" / f"job-{job_id}-{uuid.uuid4().hex}"
    result.save(staging)
    old = None
    if final.exists():
        old = staging.with_name(staging.name + "-old")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def run_detection(
    db: Database,
    settings: Settings,
    job_id: int,
    *,
    worker: str,
    detectors: DetectorProvider,
    dispatcher: Dispatcher,
    time_limits: tuple[type[BaseException], ...] = (),
) -> DetectionOutcome:
    """Run job ``job_id`` if it is ours to run; see the module docstring. An exception of a ``time_limits`` type
    raised while the detector runs fails the job at once with the detector's soft time limit as the reason."""
    lease = acquire_lease(db, job_id, worker, settings.workers.lease_seconds, settings)
    if lease is None:
        return DetectionOutcome(job_id, "skipped")
    log.info(
        "job %d: attempt %d on %s, detector %s, series %s, %d instances",
        job_id,
        lease.attempt,
        worker,
        lease.detector,
        lease.series_instance_uid,
        len(lease.file_paths),
    )
    started = time.monotonic()
    with LeaseKeeper(db, lease, settings.workers.lease_seconds) as keeper:
        try:
            detector = detectors(lease.detector)
            began = time.perf_counter()
            datasets = read_series(lease.file_paths)
            read = time.perf_counter()
            result = detector.score_series(datasets)
            scored = time.perf_counter()
            if keeper.lost.is_set():
                return DetectionOutcome(job_id, "lost", "lease lost while scoring; result discarded")
            path = save_result(result, settings.results_dir, job_id)
            saved = time.perf_counter()
        except time_limits:
            limit = settings.detector(lease.detector).soft_time_limit_seconds
            return _failed(db, lease, f"time limit: the detector ran longer than the soft limit of {limit:g} s")
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if is_transient(err):
                return _retry(db, settings, dispatcher, lease, reason)
            log.exception("job %d: failed", job_id)
            return _failed(db, lease, reason)
    deliver = bool(settings.destinations or settings.webhooks)
    if deliver:
        # The delivery task usually runs next in this very process: it gets the result and the headers from here
        # instead of reading them back from disk (dicom_node.delivery.handover).
        handover.keep(job_id, path, result, datasets)
    timing = f"read {read - began:.2f} s, score {scored - read:.2f} s, save {saved - scored:.2f} s"
    if not complete_job(
        db,
        lease,
        series_score=float(result.series_score),
        image_threshold=float(result.image_threshold),
        is_abnormal=result.is_abnormal,
        result_path=str(path),
        timing=f"in {saved - began:.2f} s ({timing})",
    ):
        handover.clear()
        return DetectionOutcome(job_id, "lost", "lease lost before the result was recorded")
    log.info(
        "job %d: succeeded in %.1f s (%s), score %.4g, %s",
        job_id,
        time.monotonic() - started,
        timing,
        result.series_score,
        "abnormal" if result.is_abnormal else "normal",
    )
    if deliver:
        send_delivery(db, dispatcher, job_id)
    return DetectionOutcome(job_id, "succeeded")


def _failed(db: Database, lease: Lease, reason: str) -> DetectionOutcome:
    log.error("job %d: failed: %s", lease.job_id, reason)
    fail_job(db, lease, reason)
    return DetectionOutcome(lease.job_id, "failed", reason)


def _retry(db: Database, settings: Settings, dispatcher: Dispatcher, lease: Lease, reason: str) -> DetectionOutcome:
    delay = retry_later(db, settings, lease, reason)
    if delay is None:
        log.error("job %d: failed after %d attempts: %s", lease.job_id, lease.attempt, reason)
        return DetectionOutcome(lease.job_id, "failed", reason)
    log.warning("job %d: %s; retrying in %.0f s", lease.job_id, reason, delay)
    send_detection(db, dispatcher, [lease.job_id], countdown=delay)
    return DetectionOutcome(lease.job_id, "retry", reason)
