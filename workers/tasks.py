"""Celery tasks for detection; thin wrappers around dicom_node.workers.detection.

``DetectRequest`` runs in the worker's main process: when the pool process running a detection dies (kill -9, OOM
kill) or is killed at the hard time limit, it puts the job back in the queue at once, before Celery returns the
message (``reject_on_worker_lost``) or acknowledges it (time limit; a new message is sent), so the job never waits
for its lease."""

from __future__ import annotations

import socket
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from dicom_node.jobs.leases import worker_name
from dicom_node.workers.app import DETECT_TASK, CeleryDispatcher
from dicom_node.workers.context import get_context
from dicom_node.workers.detection import run_detection
from dicom_node.workers.heartbeat import release_lost_detection


class DetectRequest(Request):  # type: ignore[misc]
    def _job_id(self) -> Any:
        args = self.args
        return args[0] if args else None

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and not worker_state.should_terminate:
            release_lost_detection(
                self.task.app, self._job_id(), self.hostname, self.worker_pid,
                event="time_limit", reason=f"killed at the hard time limit of {timeout:g} s",
                failure="time limit", send=True,
            )  # fmt: skip
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        exited = isinstance(exc, SystemExit | KeyboardInterrupt) and not (
            self._already_cancelled or self._already_revoked
        )
        if isinstance(exc, WorkerLostError) or exited:
            release_lost_detection(
                self.task.app, self._job_id(), self.hostname, self.worker_pid,
                event="worker_lost", reason=f"pool process {self.worker_pid} of {self.hostname} died ({exc})",
                failure="worker lost", send=False,
            )  # fmt: skip
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class DetectTask(Task):  # type: ignore[misc]
    Request = DetectRequest


@shared_task(bind=True, base=DetectTask, name=DETECT_TASK, acks_late=True, reject_on_worker_lost=True)
def detect(self: Task, job_id: int) -> str:
    """Run detection job ``job_id``; returns the outcome ("succeeded", "failed", "retry", "skipped", "lost")."""
    context = get_context(self.app)
    outcome = run_detection(
        context.db,
        context.settings,
        int(job_id),
        worker=worker_name(self.request.hostname or socket.gethostname()),
        detectors=context.detector,
        dispatcher=CeleryDispatcher(self.app, context.settings),
        time_limits=(SoftTimeLimitExceeded,),
    )
    return outcome.state
