"""The sweeper: finds jobs whose worker died or whose message the broker lost, and sends them again, without ever
running one twice.

Decided from the job database, the workers' heartbeats (``dicom_node.heartbeat``) and, where the broker can be
looked into (Redis, the embedded broker: ``BrokerInspector``), the broker's own queues:

* running, and its holder is gone: its worker stopped beating for the silence limit, or a beat taken after the job
  started no longer lists its pool process. Back to queued (event ``worker_lost``), or failed once
  ``workers.max_attempts`` attempts are spent, and a new message is sent: within ``failover_grace_seconds``.
* running with an expired lease (the last resort: a holder the heartbeats know nothing of, or one that is alive
  but has not renewed, e.g. cut off from the database): the same, event ``lease_expired``.
* queued and due, but its message is nowhere: not in a broker queue, not unacknowledged there, not held by a live
  worker (Redis restarted or flushed, a send that failed). Sent again once it has been missing for two heartbeats,
  at the latest ``requeue_after_seconds`` after the broker answers again. A job merely waiting in a long queue is
  never re-sent. Where the broker cannot be looked into, a job not picked up for ``requeue_after_seconds`` is.
  If the old message still exists after all, whichever a worker takes first runs the job and the other finds it
  no longer queued.
* an unacknowledged Redis message that no live worker holds (its worker was killed): removed, so none is left
  behind; the job it carried is handled by the cases above.
* a study completed ``workers.requeue_after_seconds`` ago with a routed series that has no job at all: the node
  stopped between committing the completion and calling the scheduler. The scheduler runs for it (idempotent).
* (with destinations or webhooks) a succeeded job whose ``dicom_node.deliver`` message is missing in the same
  sense (or, on a broker that cannot be looked into, with no delivery activity for ``requeue_after_seconds``
  plus the longest destination backoff). It is sent again; delivery is idempotent (results/delivery pipeline),
  a destination that stored the results is not sent to again.

Each change is a compare-and-set on the job row (``dicom_node.jobs.lifecycle.transition``), so several sweepers (several
nodes) never re-queue the same job twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import func, or_, select, update

from dicom_node.config import Settings
from dicom_node.db import Database, DeliveryAttempt, Job, JobEvent, JobState, Series, Study, StudyState
from dicom_node.heartbeat import Liveness, liveness, mark_stopped
from dicom_node.jobs.dispatch import Dispatcher, send_delivery, send_detection
from dicom_node.jobs.identity import ModelVersions
from dicom_node.jobs.leases import release_job
from dicom_node.jobs.lifecycle import record_event
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.timeutil import utc, utcnow

log = logging.getLogger(__name__)

DELIVERY_RESEND = "delivery_resend"
DETECT_TASK = "dicom_node.detect"
DELIVER_TASK = "dicom_node.deliver"


@dataclass(frozen=True)
class BrokerSnapshot:
    """What the broker holds at one moment: (task name, job id) of the messages waiting in its queues, and its
    unacknowledged messages (delivery tag → task name, job id, seconds since the epoch it was handed out)."""

    queued: set[tuple[str, int]] = field(default_factory=set)
    unacked: dict[str, tuple[str, int | None, float]] = field(default_factory=dict)

    def pending(self) -> set[tuple[str, int]]:
        return self.queued | {(task, job) for task, job, _ in self.unacked.values() if job is not None}


class BrokerInspector(Protocol):
    """Looks into the broker (``workers.inspect``)."""

    def snapshot(self) -> BrokerSnapshot | None:
        """The broker's messages now, or None when it does not answer."""
        ...

    def forget(self, tags: Iterable[str]) -> int:
        """Remove unacknowledged messages that no live worker holds; returns how many."""
        ...


@dataclass
class SweepReport:
    lease_expired: list[int] = field(default_factory=list)
    worker_lost: list[int] = field(default_factory=list)
    resent: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    scheduled: list[int] = field(default_factory=list)
    deliveries_resent: list[int] = field(default_factory=list)
    unacked_removed: int = 0

    def __bool__(self) -> bool:
        return bool(
            self.lease_expired
            or self.worker_lost
            or self.resent
            or self.failed
            or self.scheduled
            or self.deliveries_resent
            or self.unacked_removed
        )


class Sweeper:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        dispatcher: Dispatcher,
        *,
        model_version: ModelVersions,
        deliveries: bool = True,
        inspector: BrokerInspector | None = None,
    ) -> None:
        """``model_version``: the scheduler's model versions (studies left unscheduled are scheduled here);
        ``deliveries``: also re-send lost delivery messages (only where the delivery tasks exist);
        ``inspector``: looks into the broker, so lost messages are told from queued ones."""
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.deliveries = deliveries
        self.inspector = inspector
        self.scheduler = JobScheduler(db, settings, dispatcher, model_version=model_version)
        self._missing_since: dict[tuple[str, int], datetime] = {}

    def sweep_once(self, now: datetime | None = None) -> SweepReport:
        now = now or utcnow()
        report = SweepReport()
        alive = liveness(self.db, self.settings, now)
        self._dead_holders(alive, report)
        self._expired_leases(now, report)
        snapshot = self.inspector.snapshot() if self.inspector is not None else None
        if self.inspector is None:
            self._lost_messages(now, report)
        elif snapshot is not None:
            self._missing_messages(now, snapshot, alive, report)
        send_detection(self.db, self.dispatcher, [*report.worker_lost, *report.lease_expired, *report.resent])
        self._unscheduled_studies(now, report)
        if self.deliveries and (self.settings.destinations or self.settings.webhooks):
            if self.inspector is None:
                self._lost_deliveries(now, report)
            elif snapshot is not None:
                self._missing_deliveries(now, snapshot, alive, report)
        if report:
            log.info(
                "sweep: %d jobs of dead workers and %d expired leases re-queued, %d lost messages re-sent, "
                "%d jobs failed, %d jobs scheduled, %d deliveries re-sent, %d orphaned unacked messages removed",
                len(report.worker_lost),
                len(report.lease_expired),
                len(report.resent),
                len(report.failed),
                len(report.scheduled),
                len(report.deliveries_resent),
                report.unacked_removed,
            )
        return report

    def _confirm_seconds(self) -> float:
        """How long a message must be seen missing before it is sent again: two heartbeats (a worker reports a
        message it took within one), never beyond ``requeue_after_seconds`` less one sweep."""
        workers = self.settings.workers
        return min(
            2 * workers.heartbeat_seconds + 1, max(workers.requeue_after_seconds - workers.sweep_interval_seconds, 0)
        )

    def _still_missing(self, kind: str, job_ids: Iterable[int], now: datetime) -> list[int]:
        """Of the jobs whose ``kind`` message is missing now, those missing for the confirmation time."""
        missing = {(kind, job_id) for job_id in job_ids}
        for key in [key for key in self._missing_since if key[0] == kind and key not in missing]:
            del self._missing_since[key]
        confirm = timedelta(seconds=self._confirm_seconds())
        due = []
        for key in sorted(missing):
            since = self._missing_since.setdefault(key, now)
            if now - since >= confirm:
                due.append(key[1])
                del self._missing_since[key]
        return due

    def _missing_messages(self, now: datetime, snapshot: BrokerSnapshot, alive: Liveness, report: SweepReport) -> None:
        assert self.inspector is not None
        pending = snapshot.pending() | alive.held()
        settle = now - timedelta(seconds=1)
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.queued_at).where(
                    Job.state == JobState.QUEUED,
                    or_(Job.queued_at.is_(None), Job.queued_at < settle),
                    or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
                )
            ).all()
        missing = [job_id for job_id, _ in rows if (DETECT_TASK, job_id) not in pending]
        queued_at = dict(rows)
        for job_id in self._still_missing(DETECT_TASK, missing, now):
            with self.db.session() as session:
                # Claim the re-send by moving queued_at forward; a concurrent sweeper finds queued_at changed.
                claim = update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                before = queued_at[job_id]
                claim = claim.where(Job.queued_at.is_(None) if before is None else Job.queued_at == before)
                result = session.execute(claim.values(queued_at=now).execution_options(synchronize_session=False))
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    record_event(
                        session, job_id, "resend",
                        detail="its message is in no broker queue and held by no live worker; sent again",
                    )  # fmt: skip
                    report.resent.append(job_id)
        # Unacknowledged messages whose worker is gone: nobody will ever acknowledge them.
        confirm = self._confirm_seconds()
        held_tags = alive.held_tags()
        orphans = [
            tag
            for tag, (_, _, since) in snapshot.unacked.items()
            if tag not in held_tags and now.timestamp() - since > confirm
        ]
        if orphans:
            report.unacked_removed = self.inspector.forget(orphans)

    def _missing_deliveries(
        self, now: datetime, snapshot: BrokerSnapshot, alive: Liveness, report: SweepReport
    ) -> None:
        pending = snapshot.pending() | alive.held()
        with self.db.session() as session:
            job_ids = session.scalars(
                select(Job.id).where(Job.state == JobState.SUCCEEDED, Job.finished_at < now - timedelta(seconds=1))
            ).all()
        missing = [job_id for job_id in job_ids if (DELIVER_TASK, job_id) not in pending]
        due = self._still_missing(DELIVER_TASK, missing, now)
        if not due:
            return
        with self.db.session() as session:
            for job_id in due:
                record_event(
                    session, job_id, DELIVERY_RESEND,
                    detail="its deliver message is in no broker queue and held by no live worker; sent again", at=now,
                )  # fmt: skip
        for job_id in due:
            if send_delivery(self.db, self.dispatcher, job_id):
                report.deliveries_resent.append(job_id)

    def _dead_holders(self, alive: Liveness, report: SweepReport) -> None:
        """Running jobs whose holder is gone (heartbeats), whatever their lease says."""
        with self.db.session() as session:
            jobs = session.execute(
                select(Job.id, Job.worker, Job.attempts, Job.started_at).where(Job.state == JobState.RUNNING)
            ).all()
        for job_id, worker, attempts, started_at in jobs:
            why = alive.holder_gone(worker, started_at)
            if why is None:
                continue
            moved = release_job(
                self.db, self.settings, job_id, holder=worker, attempts=attempts, event="worker_lost", reason=why,
                now=alive.now,
            )  # fmt: skip
            if moved == JobState.QUEUED:
                report.worker_lost.append(job_id)
            elif moved == JobState.FAILED:
                report.failed.append(job_id)
        for row in alive.rows.values():
            if row.stopped_at is None and alive.silent_for(row) is not None:
                log.warning("%s", alive.silent_for(row))
                mark_stopped(self.db, row.name, row.pid, "stopped beating", alive.now)

    def _lost_deliveries(self, now: datetime, report: SweepReport) -> None:
        backoff = max((d.backoff_max_seconds for d in self.settings.destinations), default=0.0)
        cutoff = now - timedelta(seconds=self.settings.workers.requeue_after_seconds + backoff)
        last_attempt = (
            select(func.max(DeliveryAttempt.started_at)).where(DeliveryAttempt.job_id == Job.id).scalar_subquery()
        )
        last_resend = (
            select(func.max(JobEvent.at))
            .where(JobEvent.job_id == Job.id, JobEvent.event == DELIVERY_RESEND)
            .scalar_subquery()
        )
        with self.db.session() as session:
            job_ids = session.scalars(
                select(Job.id).where(
                    Job.state == JobState.SUCCEEDED,
                    Job.finished_at < cutoff,
                    or_(last_attempt.is_(None), last_attempt < cutoff),
                    or_(last_resend.is_(None), last_resend < cutoff),
                )
            ).all()
            for job_id in job_ids:
                record_event(
                    session, job_id, DELIVERY_RESEND, detail="no delivery activity; deliver sent again", at=now
                )
        for job_id in job_ids:
            if send_delivery(self.db, self.dispatcher, job_id):
                report.deliveries_resent.append(job_id)

    def _unscheduled_studies(self, now: datetime, report: SweepReport) -> None:
        cutoff = now - timedelta(seconds=self.settings.workers.requeue_after_seconds)
        has_job = select(Job.id).where(Job.series_id == Series.id).exists()
        enabled = [name for name, detector in self.settings.detectors.items() if detector.enabled]
        with self.db.session() as session:
            study_ids = session.scalars(
                select(Study.id)
                .join(Series, Series.study_id == Study.id)
                .where(
                    Study.state == StudyState.COMPLETE,
                    Study.completed_at < cutoff,
                    Series.detector.in_(enabled),
                    ~has_job,
                )
                .distinct()
            ).all()
        for study_id in study_ids:
            job_ids = self.scheduler.on_study_complete(study_id)
            if job_ids:
                log.warning("study %d was complete without jobs (node stopped before scheduling)", study_id)
            report.scheduled.extend(job_ids)

    def _expired_leases(self, now: datetime, report: SweepReport) -> None:
        with self.db.session() as session:
            jobs = session.execute(
                select(Job.id, Job.worker, Job.attempts, Job.lease_expires_at).where(
                    Job.state == JobState.RUNNING, Job.lease_expires_at < now
                )
            ).all()
        lease = self.settings.workers.lease_seconds
        for job_id, worker, attempts, expires in jobs:
            why = (
                f"lease of {worker} expired at {utc(expires or now):%H:%M:%S}: not renewed for {lease:g} s "
                "(worker stuck, or cut off from the job database)"
            )
            moved = release_job(
                self.db, self.settings, job_id, holder=worker, attempts=attempts, event="lease_expired",
                reason=why, extra=[Job.lease_expires_at < now], now=now,
            )  # fmt: skip
            if moved == JobState.QUEUED:
                report.lease_expired.append(job_id)
            elif moved == JobState.FAILED:
                report.failed.append(job_id)

    def _lost_messages(self, now: datetime, report: SweepReport) -> None:
        cutoff = now - timedelta(seconds=self.settings.workers.requeue_after_seconds)
        with self.db.session() as session:
            candidates = session.execute(
                select(Job.id, Job.queued_at).where(
                    Job.state == JobState.QUEUED,
                    Job.queued_at < cutoff,
                    or_(Job.next_attempt_at.is_(None), Job.next_attempt_at < cutoff),
                )
            ).all()
        for job_id, queued_at in candidates:
            with self.db.session() as session:
                # Claim the re-send by moving queued_at forward; a concurrent sweeper finds queued_at changed.
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.QUEUED, Job.queued_at == queued_at)
                    .values(queued_at=now)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    record_event(session, job_id, "resend", detail="not picked up in time; message sent again")
                    report.resent.append(job_id)


class SweeperService:
    """Runs ``Sweeper.sweep_once`` every ``workers.sweep_interval_seconds`` in a thread of the node."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        dispatcher: Dispatcher,
        *,
        model_version: ModelVersions,
        also: Callable[[], None] | None = None,
        deliveries: bool = True,
        inspector: BrokerInspector | None = None,
    ) -> None:
        self.sweeper = Sweeper(
            db, settings, dispatcher, model_version=model_version, deliveries=deliveries, inspector=inspector
        )
        self.interval = settings.workers.sweep_interval_seconds
        self._also = also
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweeper.sweep_once()
                if self._also is not None:
                    self._also()
            except Exception:  # the sweeper must outlive a database or broker hiccup
                log.exception("sweep failed; trying again in %.0f s", self.interval)
