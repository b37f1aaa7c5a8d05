"""Celery tasks for detection; thin wrappers around dicom_node.processing."""

from __future__ import annotations

import socket

from celery import Task, shared_task

from dicom_node.jobs import worker_name
from dicom_node.processing import run_detection
from workers.app import DETECT_TASK, CeleryDispatcher
from workers.context import get_context


@shared_task(bind=True, name=DETECT_TASK, acks_late=True, reject_on_worker_lost=True)
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
    )
    return outcome.state
