"""The detection job state machine; the job database is the source of truth, the broker only carries hints.

Lifecycle (``JobState``)::

    queued ──lease──▶ running ──▶ succeeded ──▶ delivered | delivery_failed
      ▲                  │   └──▶ failed (reason)
      └── retry/expired ─┘
    any state ──▶ superseded (a new instance set of the same series replaced the job)

Every transition is a compare-and-set ``UPDATE ... WHERE id = :id AND state = :expected`` (plus the lease holder for
a running job) and is recorded as a ``JobEvent`` in the same transaction, so two schedulers, two sweepers or two
workers that race never both win, and the admin timeline shows every step. Broker messages are sent only after the
transaction that created or re-queued the job has committed; a message that is lost (worker killed, Redis restarted
or flushed) is re-sent by the sweeper (``dicom_node.sweeper``), and a message that arrives twice finds the job no
longer queued and does nothing.

``Job.result_key`` is the sha256 of (Study Instance UID, Series Instance UID, detector, model version, sorted SOP
Instance UIDs) and is unique: the same input never gets a second job, hence never a second result set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Database, Instance, Job, JobEvent, JobState, Series, Study
from dicom_node.heartbeat import Liveness
from dicom_node.timeutil import utc, utcnow

log = logging.getLogger(__name__)

UNVERSIONED = "unversioned"
URGENT_PRIORITY = 0
NORMAL_PRIORITY = 5

# States in which a job still stands for the current result of its series (not replaced, not abandoned).
ACTIVE_STATES = frozenset(
    {JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.DELIVERED, JobState.DELIVERY_FAILED}
)
DELIVERABLE_STATES = frozenset({JobState.SUCCEEDED, JobState.DELIVERED, JobState.DELIVERY_FAILED})


class JobStateError(Exception):
    """An action that the job's current state does not allow (e.g. retrying a running job)."""


class TransientJobError(Exception):
    """A failure worth retrying with backoff (spool briefly unreachable, database busy, GPU out of memory)."""


class Dispatcher(Protocol):
    """Sends broker messages for jobs; implemented by ``workers.app.CeleryDispatcher``.

    Returns the broker's task id. Raises on a broker error; callers treat that as "the sweeper will re-send"."""

    def enqueue_detection(self, job: Job, *, countdown: float | None = None) -> str: ...

    def enqueue_delivery(self, job: Job, *, force: bool = False) -> str: ...


# --- identity of a result ---------------------------------------------------------------------------------------


def instance_set_hash(sop_instance_uids: Iterable[str]) -> str:
    """sha256 over the sorted SOP Instance UIDs: the same set in any order gives the same hash."""
    digest = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        digest.update(uid.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


def compute_result_key(
    study_instance_uid: str,
    series_instance_uid: str,
    detector: str,
    model_version: str,
    sop_instance_uids: Iterable[str],
) -> str:
    """The unique key of one result set: (study, series, detector, model version, instance set)."""
    digest = hashlib.sha256()
    for part in (study_instance_uid, series_instance_uid, detector, model_version):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    digest.update(instance_set_hash(sop_instance_uids).encode("ascii"))
    return digest.hexdigest()


def shipped_model_dir(detector: str) -> Path:
    """The detector's shipped weights folder (``models/<detector>/weights``), from its spec: found without importing
    torch or the detector code."""
    from dicom_node.models import registry

    try:
        return registry.model_dir(detector)
    except registry.UnknownDetectorError:  # ships no weights: no model card here, the jobs are keyed as unversioned
        return Path(registry.__file__).resolve().parent / "no-shipped-weights" / detector


def model_version(settings: Settings, detector: str) -> str:
    """The ``version`` in the detector's model card (``model_card.json``); "unversioned" when there is none.

    Read from the configured ``detectors.<name>.model_dir`` or the shipped weights, so the node that schedules
    jobs never loads torch."""
    model_dir = settings.detector(detector).model_dir or shipped_model_dir(detector)
    card = Path(model_dir) / "model_card.json"
    try:
        version = json.loads(card.read_text(encoding="utf-8")).get("version")
    except FileNotFoundError:
        return UNVERSIONED
    except (OSError, ValueError, AttributeError) as err:
        log.warning("cannot read model card %s (%s); jobs are keyed as unversioned", card, err)
        return UNVERSIONED
    return str(version)[:64] if version else UNVERSIONED


def _matches(values: Sequence[str], actual: str | None) -> bool:
    return not values or (actual or "").upper() in {value.upper() for value in values}


def is_urgent(settings: Settings, study: Study, series: Series) -> bool:
    """Whether a triage rule (``workers.urgent_rules``) sends this series to the urgent lane."""
    return any(
        _matches(rule.calling_ae_title, study.calling_ae_title)
        and _matches(rule.modality, series.modality)
        and _matches(rule.detector, series.detector)
        for rule in settings.workers.urgent_rules
    )


# --- transitions -------------------------------------------------------------------------------------------------


def record_event(
    session: Session,
    job_id: int,
    event: str,
    *,
    from_state: JobState | None = None,
    to_state: JobState | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> None:
    session.add(
        JobEvent(
            job_id=job_id,
            at=at or utcnow(),
            event=event,
            from_state=from_state.value if from_state else None,
            to_state=to_state.value if to_state else None,
            detail=detail,
        )
    )


def transition(
    session: Session,
    job_id: int,
    expected: JobState,
    to_state: JobState,
    event: str,
    *,
    detail: str | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Compare-and-set the job's state from ``expected`` to ``to_state`` and record the event.

    Returns False, changing nothing, when the job is no longer in ``expected`` (or ``where`` does not hold):
    someone else moved it first."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.state == expected, *where)
        .values(state=to_state, **values)
        .execution_options(synchronize_session=False)
    )
    if session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
        return False
    record_event(session, job_id, event, from_state=expected, to_state=to_state, detail=detail)
    return True


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Exponential backoff after the ``attempts``-th failed attempt, capped."""
    base = settings.workers.retry_backoff_seconds * (2 ** max(attempts - 1, 0))
    return float(min(base, settings.workers.retry_backoff_max_seconds))


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


# --- scheduling --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SeriesInput:
    series_id: int
    series_instance_uid: str
    detector: str
    sop_instance_uids: tuple[str, ...]
    urgent: bool


class JobScheduler:
    """Turns completed studies into detection jobs; registered as an ``on_study_complete`` callback."""

    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher) -> None:
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher

    def __call__(self, study_id: int) -> None:
        self.on_study_complete(study_id)

    def on_study_complete(self, study_id: int) -> list[int]:
        """Create (idempotently) one job per routed series of the study and enqueue it; returns the new job ids.

        A series whose instance set changed since its last job (late instances) gets a new job; the old one is
        marked superseded and the new one points to it with ``predecessor_job_id``."""
        jobs = self._schedule_in_transaction(study_id, rerun=False)
        send_detection(self.db, self.dispatcher, jobs)  # all created or reactivated, committed as queued
        return [job.id for job in jobs]

    def schedule(self, study_id: int, *, rerun: bool) -> list[int]:
        return [job.id for job in self._schedule_in_transaction(study_id, rerun=rerun)]

    def _schedule_in_transaction(self, study_id: int, *, rerun: bool) -> list[Job]:
        """Create the jobs in one transaction (retried once if a concurrent scheduler raced us on result_key).

        With ``rerun`` an existing job with the same result key that has finished is queued again (same result
        set, overwritten), instead of being left alone."""
        for attempt in (1, 2):
            try:
                with self.db.session() as session:
                    return self._schedule(session, study_id, rerun=rerun)
            except IntegrityError:
                if attempt == 2:
                    raise
                log.info("study %d: another scheduler created the same job; re-reading", study_id)
        return []

    def _series_inputs(self, session: Session, study: Study) -> list[_SeriesInput]:
        inputs = []
        for series in study.series:
            if not series.detector:
                continue
            if not self.settings.detector(series.detector).enabled:
                log.info("series %s: detector %s is disabled; no job", series.series_instance_uid, series.detector)
                continue
            uids = session.scalars(select(Instance.sop_instance_uid).where(Instance.series_id == series.id)).all()
            if not uids:
                continue
            inputs.append(
                _SeriesInput(
                    series_id=series.id,
                    series_instance_uid=series.series_instance_uid,
                    detector=series.detector,
                    sop_instance_uids=tuple(uids),
                    urgent=is_urgent(self.settings, study, series),
                )
            )
        return inputs

    def _schedule(self, session: Session, study_id: int, *, rerun: bool) -> list[Job]:
        study = session.get(Study, study_id)
        if study is None:
            log.warning("study %d not found; no jobs", study_id)
            return []
        versions: dict[str, str] = {}
        jobs: list[Job] = []
        for item in self._series_inputs(session, study):
            version = versions.setdefault(item.detector, model_version(self.settings, item.detector))
            key = compute_result_key(
                study.study_instance_uid, item.series_instance_uid, item.detector, version, item.sop_instance_uids
            )
            existing = session.scalar(select(Job).where(Job.result_key == key))
            if existing is not None:
                if existing.state == JobState.SUPERSEDED:
                    # The input is back to one seen before (e.g. a model rolled back): that job is current again.
                    if _reactivate(session, existing):
                        jobs.append(existing)
                elif rerun and _requeue_for_rerun(session, existing):
                    jobs.append(existing)
                else:
                    log.info(
                        "series %s: job %d already covers this instance set (%s)",
                        item.series_instance_uid,
                        existing.id,
                        existing.state.value,
                    )
                continue
            jobs.append(self._create_job(session, study, item, version, key))
        return jobs

    def _create_job(self, session: Session, study: Study, item: _SeriesInput, version: str, key: str) -> Job:
        now = utcnow()
        previous = session.scalars(
            select(Job)
            .where(Job.series_id == item.series_id, Job.detector == item.detector, Job.state != JobState.SUPERSEDED)
            .order_by(Job.id)
        ).all()
        job = Job(
            study_id=study.id,
            series_id=item.series_id,
            detector=item.detector,
            model_version=version,
            instance_set_hash=instance_set_hash(item.sop_instance_uids),
            result_key=key,
            state=JobState.QUEUED,
            priority=URGENT_PRIORITY if item.urgent else NORMAL_PRIORITY,
            urgent=item.urgent,
            attempts=0,
            study_completed_at=study.completed_at,
            created_at=now,
            queued_at=now,
            predecessor_job_id=previous[-1].id if previous else None,
        )
        session.add(job)
        session.flush()  # a concurrent scheduler with the same result_key fails here (unique) and re-reads
        detail = f"{len(item.sop_instance_uids)} instances, model {version}" + (", urgent" if item.urgent else "")
        record_event(session, job.id, "created", to_state=JobState.QUEUED, detail=detail)
        _supersede(session, previous, job.id)
        log.info(
            "job %d queued: series %s, detector %s, %d instances%s",
            job.id,
            item.series_instance_uid,
            item.detector,
            len(item.sop_instance_uids),
            " (urgent)" if item.urgent else "",
        )
        return job


def _supersede(session: Session, jobs: Iterable[Job], replaced_by: int) -> None:
    for old in jobs:
        if old.id != replaced_by and transition(
            session, old.id, old.state, JobState.SUPERSEDED, "superseded", detail=f"replaced by job {replaced_by}"
        ):
            log.info("job %d superseded by job %d (instance set or model changed)", old.id, replaced_by)


def _requeued_fields() -> dict[str, Any]:
    """Columns a job gets when it goes back to ``queued``: no message, holder, lease or error from before."""
    return {
        "broker_task_id": None,
        "queued_at": utcnow(),
        "next_attempt_at": None,
        "error": None,
        "worker": None,
        "lease_expires_at": None,
    }


def _reactivate(session: Session, job: Job) -> bool:
    current = session.scalars(
        select(Job).where(
            Job.series_id == job.series_id, Job.detector == job.detector, Job.state != JobState.SUPERSEDED
        )
    ).all()
    if not transition(
        session,
        job.id,
        JobState.SUPERSEDED,
        JobState.QUEUED,
        "reactivated",
        detail="its instance set and model version are current again",
        **_requeued_fields(),
    ):
        return False
    _supersede(session, current, job.id)
    return True


def _requeue_for_rerun(session: Session, job: Job) -> bool:
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        return False  # already on its way; a second message would only be dropped
    return transition(
        session,
        job.id,
        job.state,
        JobState.QUEUED,
        "rerun",
        detail="re-run requested",
        **_requeued_fields(),
    )


# --- admin actions -----------------------------------------------------------------------------------------------


def _load(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobStateError(f"job {job_id} does not exist")
    return job


def retry_job(db: Database, dispatcher: Dispatcher, job_id: int) -> Job:
    """Queue a failed job again (attempts keep counting); a queued job is just sent again."""
    with db.session() as session:
        job = _load(session, job_id)
        if job.state == JobState.FAILED:
            if not transition(
                session,
                job_id,
                JobState.FAILED,
                JobState.QUEUED,
                "retry",
                detail=f"retry requested (was: {job.error or 'no reason'})",
                **_requeued_fields(),
            ):
                raise JobStateError(f"job {job_id} changed state meanwhile; try again")
        elif job.state == JobState.QUEUED:
            record_event(session, job_id, "resend", detail="retry requested while queued: message sent again")
        else:
            raise JobStateError(f"job {job_id} is {job.state.value}; only failed or queued jobs can be retried")
    send_detection(db, dispatcher, [job_id])
    return _fresh(db, job_id)


def rerun_study(db: Database, settings: Settings, dispatcher: Dispatcher, study_uid: str) -> list[int]:
    """Run the detectors on a study again; returns the ids of the jobs queued.

    Series whose result key is unchanged re-run the same job (its result set is overwritten, never duplicated);
    series whose instance set or model version changed get a new job that supersedes the old one."""
    with db.session() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if study_id is None:
        raise JobStateError(f"study {study_uid} is not in the job database")
    job_ids = JobScheduler(db, settings, dispatcher).schedule(study_id, rerun=True)
    send_detection(db, dispatcher, job_ids)
    return job_ids


def redeliver_job(db: Database, dispatcher: Dispatcher, job_id: int) -> Job:
    """Send a finished job's results to the destinations again (back to succeeded, then ``dicom_node.deliver``)."""
    with db.session() as session:
        job = _load(session, job_id)
        if job.state not in DELIVERABLE_STATES:
            raise JobStateError(
                f"job {job_id} is {job.state.value}; only succeeded, delivered or delivery_failed jobs can be "
                "redelivered"
            )
        if job.state != JobState.SUCCEEDED and not transition(
            session, job_id, job.state, JobState.SUCCEEDED, "redeliver", detail="redelivery requested"
        ):
            raise JobStateError(f"job {job_id} changed state meanwhile; try again")
        if job.state == JobState.SUCCEEDED:
            record_event(session, job_id, "redeliver", detail="redelivery requested")
    send_delivery(db, dispatcher, job_id, force=True)
    return _fresh(db, job_id)


def _fresh(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = _load(session, job_id)
        session.expunge(job)
        return job


# --- worker side: lease, renew, finish ---------------------------------------------------------------------------


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
        if job.state == JobState.QUEUED:
            due = job.next_attempt_at is None or utc(job.next_attempt_at) <= now + timedelta(seconds=1)
            if not due:
                log.info("job %d: retry not due before %s; message dropped", job_id, job.next_attempt_at)
                return None
            guard: list[ColumnElement[bool]] = []
            event, detail = "started", f"attempt {job.attempts + 1} on {worker}"
        elif job.state == JobState.RUNNING:
            expired = job.lease_expires_at is None or utc(job.lease_expires_at) < now
            if expired:
                why: str | None = f"lease of {job.worker} expired"
            elif _holder_is_dead(job.worker, worker):
                why = f"process of {job.worker} is gone"
            elif settings is not None:
                why = Liveness.load(session, settings, now).holder_gone(job.worker, job.started_at)
            else:
                why = None
            if why is None:
                log.info("job %d: running on %s; duplicate message dropped", job_id, job.worker)
                return None
            guard = [Job.worker.is_(None) if job.worker is None else Job.worker == job.worker]
            event, detail = "taken_over", f"attempt {job.attempts + 1} on {worker}; {why}"
        else:
            log.info("job %d: %s; message dropped", job_id, job.state.value)
            return None
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
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
        series_uid = session.scalar(select(Series.series_instance_uid).where(Series.id == job.series_id))
        paths = session.scalars(
            select(Instance.file_path).where(Instance.series_id == job.series_id).order_by(Instance.id)
        ).all()
        return Lease(
            job_id=job_id,
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
