"""The sweeper: finds jobs the broker lost and sends them again, without ever running one twice.

Three cases, all decided from the job database alone:

* running with an expired lease: the worker died (kill -9, host lost, hard time limit) or stalled. The job goes
  back to queued (or to failed once ``workers.max_attempts`` attempts are spent) and a new message is sent.
* queued, due, and not picked up for ``workers.requeue_after_seconds``: the message was lost (Redis restarted or
  flushed, a send that failed). A new message is sent. If the old one still exists, whichever a worker takes first
  runs the job and the other finds it no longer queued.
* a study completed ``workers.requeue_after_seconds`` ago with a routed series that has no job at all: the node
  stopped between committing the completion and calling the scheduler. The scheduler runs for it (idempotent).
* (with destinations or webhooks) a succeeded job with no delivery activity for ``workers.requeue_after_seconds``
  plus the longest destination backoff: its ``dicom_node.deliver`` message was lost (worker killed right after
  the detection, Redis flushed). It is sent again; delivery is idempotent (results/delivery pipeline), a
  destination that stored the results is not sent to again.

Each change is a compare-and-set on the job row (``dicom_node.jobs.transition``), so several sweepers (several
nodes) never re-queue the same job twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from dicom_node.config import Settings
from dicom_node.db import Database, DeliveryAttempt, Job, JobEvent, JobState, Series, Study, StudyState
from dicom_node.jobs import (
    Dispatcher,
    JobScheduler,
    as_utc,
    record_event,
    send_delivery,
    send_detection,
    transition,
    utcnow,
)

log = logging.getLogger(__name__)

DELIVERY_RESEND = "delivery_resend"


@dataclass
class SweepReport:
    lease_expired: list[int] = field(default_factory=list)
    resent: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    scheduled: list[int] = field(default_factory=list)
    deliveries_resent: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.lease_expired or self.resent or self.failed or self.scheduled or self.deliveries_resent)


class Sweeper:
    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher, *, deliveries: bool = True) -> None:
        """``deliveries``: also re-send lost delivery messages (only where the delivery tasks exist)."""
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.deliveries = deliveries
        self.scheduler = JobScheduler(db, settings, dispatcher)

    def sweep_once(self, now: datetime | None = None) -> SweepReport:
        now = now or utcnow()
        report = SweepReport()
        self._expired_leases(now, report)
        self._lost_messages(now, report)
        send_detection(self.db, self.dispatcher, [*report.lease_expired, *report.resent])
        self._unscheduled_studies(now, report)
        if self.deliveries and (self.settings.destinations or self.settings.webhooks):
            self._lost_deliveries(now, report)
        if report:
            log.info(
                "sweep: %d expired leases re-queued, %d lost messages re-sent, %d jobs failed, %d jobs scheduled, "
                "%d deliveries re-sent",
                len(report.lease_expired),
                len(report.resent),
                len(report.failed),
                len(report.scheduled),
                len(report.deliveries_resent),
            )
        return report

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
                select(Job.id, Job.worker, Job.attempts, Job.started_at, Job.detector).where(
                    Job.state == JobState.RUNNING, Job.lease_expires_at < now
                )
            ).all()
        for job_id, worker, attempts, started_at, detector in jobs:
            hard_limit = self.settings.detector(detector).time_limit_seconds
            over_limit = started_at is not None and as_utc(started_at) + timedelta(seconds=hard_limit) < now
            why = f"lease of {worker} expired" + (f" (over the time limit of {hard_limit:g} s)" if over_limit else "")
            held = [Job.worker == worker, Job.attempts == attempts, Job.lease_expires_at < now]
            with self.db.session() as session:
                if attempts >= self.settings.workers.max_attempts:
                    reason = (
                        f"{'time limit' if over_limit else 'worker lost'}: {why}; gave up after {attempts} attempts"
                    )
                    if transition(
                        session, job_id, JobState.RUNNING, JobState.FAILED, "failed", detail=reason, where=held,
                        error=reason, finished_at=now, lease_expires_at=None,
                    ):  # fmt: skip
                        report.failed.append(job_id)
                elif transition(
                    session, job_id, JobState.RUNNING, JobState.QUEUED, "lease_expired", detail=why, where=held,
                    queued_at=now, next_attempt_at=None, lease_expires_at=None, error=why,
                ):  # fmt: skip
                    report.lease_expired.append(job_id)

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
        also: Callable[[], None] | None = None,
        deliveries: bool = True,
    ) -> None:
        self.sweeper = Sweeper(db, settings, dispatcher, deliveries=deliveries)
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
