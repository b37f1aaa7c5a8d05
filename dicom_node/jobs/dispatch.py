"""Broker messages for jobs. The job database is the source of truth, the broker only carries hints: messages are
sent only after the transaction that created or re-queued the job has committed; a message that is lost (worker
killed, Redis restarted or flushed) is re-sent by the sweeper (``dicom_node.jobs.sweeper``), and a message that
arrives twice finds the job no longer queued and does nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from sqlalchemy import update

from dicom_node.db import Database, Job, JobState

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Sends broker messages for jobs; implemented by ``workers.app.CeleryDispatcher``.

    Returns the broker's task id. Raises on a broker error; callers treat that as "the sweeper will re-send"."""

    def enqueue_detection(self, job: Job, *, countdown: float | None = None) -> str: ...

    def enqueue_delivery(self, job: Job, *, force: bool = False) -> str: ...


def send_detection(
    db: Database, dispatcher: Dispatcher, jobs: Iterable[int | Job], countdown: float | None = None
) -> int:
    """Send a ``dicom_node.detect`` message for each job still queued; returns how many were sent.

    ``jobs`` are ids (the job is re-read and skipped unless queued) or Job objects the caller has just committed
    as queued. Call only after that commit. A broker error is logged, not raised: the job stays queued in the
    database and the sweeper sends it again."""
    sent = 0
    for item in jobs:
        job = item if isinstance(item, Job) else _queued(db, item)
        if job is None:
            continue
        try:
            task_id = dispatcher.enqueue_detection(job, countdown=countdown)
        except Exception as err:  # any broker/transport error: the sweeper re-sends
            log.warning(
                "job %d: could not enqueue (%s: %s); the sweeper will re-send it", job.id, type(err).__name__, err
            )
            continue
        with db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.QUEUED)
                .values(broker_task_id=task_id)
                .execution_options(synchronize_session=False)
            )
        sent += 1
    return sent


def _queued(db: Database, job_id: int) -> Job | None:
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.QUEUED:
            return None
        session.expunge(job)
        return job


def send_delivery(db: Database, dispatcher: Dispatcher, job_id: int, *, force: bool = False) -> bool:
    """Send a ``dicom_node.deliver`` message; ``force`` sends again to destinations that already stored it."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return False
        session.expunge(job)
    try:
        dispatcher.enqueue_delivery(job, force=force)
    except Exception as err:  # broker error: the admin can redeliver; logged with the job id
        log.warning("job %d: could not enqueue delivery (%s: %s)", job_id, type(err).__name__, err)
        return False
    return True
