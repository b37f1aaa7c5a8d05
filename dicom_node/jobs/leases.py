"""The worker side of the lifecycle: take a job's lease, renew it, and finish the attempt (succeeded, failed, back
to queued with backoff, or released when its holder is gone).

A running job is held by one worker process (``Job.worker``, ``node#pid``) for one attempt (``Job.attempts``); every
change below is a compare-and-set on both, so a worker that stalled and lost its lease can no longer record an
outcome over the one that took over."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Database, Instance, Job, JobState, Series, Study
from dicom_node.heartbeat import Liveness
from dicom_node.jobs.lifecycle import transition
from dicom_node.timeutil import utc, utcnow

log = logging.getLogger(__name__)


class TransientJobError(Exception):
    """A failure worth retrying with backoff (spool briefly unreachable, database busy, GPU out of memory)."""


@dataclass(frozen=True)
class Lease:
    """What a worker needs to run a job it holds."""

    job_id: int
    worker: str
    attempt: int
    detector: str
    study_instance_uid: str
    series_instance_uid: str
    file_paths: tuple[str, ...]


_HOLDER = re.compile(r"^(?P<node>.+)#(?P<pid>\d+)$")


def worker_name(nodename: str, pid: int | None = None) -> str:
    """The lease holder's name: Celery node name and process id (``celery@host#1234``)."""
    return f"{nodename}#{os.getpid() if pid is None else pid}"


def _holder_is_dead(holder: str | None, me: str) -> bool:
    """A lease held by a process of this same worker node that no longer exists (its pool child was killed).

    Lets the redelivered message take the job at once instead of waiting for the lease to run out."""
    if not holder:
        return False
    theirs, mine = _HOLDER.match(holder), _HOLDER.match(me)
    if not theirs or not mine or theirs["node"] != mine["node"] or theirs["pid"] == mine["pid"]:
        return False
    try:
        os.kill(int(theirs["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire_lease(
    db: Database, job_id: int, worker: str, lease_seconds: float, settings: Settings | None = None
) -> Lease | None:
    """Take the job for ``worker`` if it is queued and due, or running under a holder that is gone (its worker
    stopped beating, its pool process is not in the worker's latest heartbeat; ``settings`` gives the heartbeat
    limits) or whose lease expired (the last resort).

    Returns None when the job is not ours to run: done, failed, superseded, not due yet, or held by a live
    worker. Counts the attempt."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %d: not in the database; message dropped", job_id)
            return None
        now = utcnow()
        claim = _claim(session, job, worker, settings, now)
        if claim is None:
            return None
        event, detail, guard = claim
        if not transition(
            session,
            job_id,
            job.state,
            JobState.RUNNING,
            event,
            detail=detail,
            where=[Job.attempts == job.attempts, *guard],
            worker=worker,
            attempts=job.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            next_attempt_at=None,
            error=None,
        ):
            log.info("job %d: another worker took it first", job_id)
            return None
        return _lease_of(session, job, worker)


def _claim(
    session: Session, job: Job, worker: str, settings: Settings | None, now: datetime
) -> tuple[str, str, list[ColumnElement[bool]]] | None:
    """(event, detail, extra compare-and-set guard) for taking ``job`` now, or None (logged) when it is not ours."""
    if job.state == JobState.QUEUED:
        due = job.next_attempt_at is None or utc(job.next_attempt_at) <= now + timedelta(seconds=1)
        if not due:
            log.info("job %d: retry not due before %s; message dropped", job.id, job.next_attempt_at)
            return None
        return "started", f"attempt {job.attempts + 1} on {worker}", []
    if job.state == JobState.RUNNING:
        why = _holder_gone(session, job, worker, settings, now)
        if why is None:
            log.info("job %d: running on %s; duplicate message dropped", job.id, job.worker)
            return None
        guard = [Job.worker.is_(None) if job.worker is None else Job.worker == job.worker]
        return "taken_over", f"attempt {job.attempts + 1} on {worker}; {why}", guard
    log.info("job %d: %s; message dropped", job.id, job.state.value)
    return None


def _holder_gone(session: Session, job: Job, worker: str, settings: Settings | None, now: datetime) -> str | None:
    """Why the running job's holder is gone (lease expired, pool process dead, heartbeats), or None: it is alive."""
    if job.lease_expires_at is None or utc(job.lease_expires_at) < now:
        return f"lease of {job.worker} expired"
    if _holder_is_dead(job.worker, worker):
        return f"process of {job.worker} is gone"
    if settings is not None:
        return Liveness.load(session, settings, now).holder_gone(job.worker, job.started_at)
    return None


def _lease_of(session: Session, job: Job, worker: str) -> Lease:
    """The lease just taken: ``job`` as read before the compare-and-set, so its attempt is ``attempts + 1``."""
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
    series_uid = session.scalar(select(Series.series_instance_uid).where(Series.id == job.series_id))
    paths = session.scalars(
        select(Instance.file_path).where(Instance.series_id == job.series_id).order_by(Instance.id)
    ).all()
    return Lease(
        job_id=job.id,
        worker=worker,
        attempt=job.attempts + 1,
        detector=job.detector,
        study_instance_uid=study_uid or "",
        series_instance_uid=series_uid or "",
        file_paths=tuple(paths),
    )


def _held_by(lease: Lease) -> list[ColumnElement[bool]]:
    return [Job.worker == lease.worker, Job.attempts == lease.attempt]


def renew_lease(db: Database, lease: Lease, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer ours (superseded, or taken over after we stalled)."""
    with db.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == lease.job_id, Job.state == JobState.RUNNING, *_held_by(lease))
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def complete_job(
    db: Database,
    lease: Lease,
    *,
    series_score: float,
    image_threshold: float,
    is_abnormal: bool,
    result_path: str,
    timing: str = "",
) -> bool:
    """Mark the job succeeded with its result; False (nothing changed) when the lease was lost meanwhile.
    ``timing`` (where the time went) is added to the event's detail."""
    verdict = f"score {series_score:.4g} (threshold {image_threshold:.4g}){', abnormal' if is_abnormal else ''}"
    with db.session() as session:
        return transition(
            session,
            lease.job_id,
            JobState.RUNNING,
            JobState.SUCCEEDED,
            "succeeded",
            detail=f"{verdict} {timing}".rstrip(),
            where=_held_by(lease),
            series_score=series_score,
            image_threshold=image_threshold,
            is_abnormal=is_abnormal,
            result_path=result_path,
            finished_at=utcnow(),
            lease_expires_at=None,
            error=None,
        )


def fail_job(db: Database, lease: Lease, reason: str) -> bool:
    """Mark the job failed for good, keeping the reason."""
    with db.session() as session:
        return transition(
            session,
            lease.job_id,
            JobState.RUNNING,
            JobState.FAILED,
            "failed",
            detail=reason,
            where=_held_by(lease),
            error=reason,
            finished_at=utcnow(),
            lease_expires_at=None,
        )


def retry_later(db: Database, settings: Settings, lease: Lease, reason: str) -> float | None:
    """After a transient error: back to queued with ``next_attempt_at`` (returns the delay in seconds), or failed
    with the reason once ``workers.max_attempts`` attempts are spent (returns None)."""
    if lease.attempt >= settings.workers.max_attempts:
        fail_job(db, lease, f"{reason} (gave up after {lease.attempt} attempts)")
        return None
    delay = backoff_seconds(settings, lease.attempt)
    now = utcnow()
    with db.session() as session:
        moved = transition(
            session,
            lease.job_id,
            JobState.RUNNING,
            JobState.QUEUED,
            "retry_scheduled",
            detail=f"{reason}; attempt {lease.attempt + 1} in {delay:.0f} s",
            where=_held_by(lease),
            error=reason,
            queued_at=now,
            next_attempt_at=now + timedelta(seconds=delay),
            lease_expires_at=None,
        )
    return delay if moved else None


def release_job(
    db: Database,
    settings: Settings,
    job_id: int,
    *,
    holder: str | None,
    attempts: int,
    event: str,
    reason: str,
    failure: str = "worker lost",
    extra: Sequence[ColumnElement[bool]] = (),
    now: datetime | None = None,
) -> JobState | None:
    """A running job whose holder is gone goes back to ``queued`` (event ``event``, detail ``reason``), or to
    ``failed`` once ``workers.max_attempts`` attempts are spent (``failure: reason; gave up after N attempts``).

    Compare-and-set on holder and attempt: a holder that came back, or another releaser, leaves nothing to do
    (None). The caller sends the message (``send_detection``) unless the broker returns the old one."""
    held = [Job.worker.is_(None) if holder is None else Job.worker == holder, Job.attempts == attempts, *extra]
    now = now or utcnow()
    with db.session() as session:
        if attempts >= settings.workers.max_attempts:
            final = f"{failure}: {reason}; gave up after {attempts} attempts"
            if transition(
                session, job_id, JobState.RUNNING, JobState.FAILED, "failed", detail=final, where=held,
                error=final, finished_at=now, lease_expires_at=None,
            ):  # fmt: skip
                log.error("job %d: failed: %s", job_id, final)
                return JobState.FAILED
            return None
        if transition(
            session, job_id, JobState.RUNNING, JobState.QUEUED, event, detail=f"{reason}; re-queued", where=held,
            queued_at=now, next_attempt_at=None, lease_expires_at=None, error=reason,
        ):  # fmt: skip
            log.warning("job %d: %s; re-queued", job_id, reason)
            return JobState.QUEUED
    return None


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Exponential backoff after the ``attempts``-th failed attempt, capped."""
    base = settings.workers.retry_backoff_seconds * (2 ** max(attempts - 1, 0))
    return float(min(base, settings.workers.retry_backoff_max_seconds))
