"""Prometheus metrics computed from the job database at scrape time.

A custom collector (not counters incremented in-process) because the node's work is spread over processes and
hosts: the SCP, the completion loop, embedded or remote Celery workers and the delivery tasks all write to the one
job database, so reading it at scrape time gives the same answer whichever process serves ``/metrics``.
Histograms are aggregated in SQL (one row per detector, one column per bucket), so a scrape costs a few grouped
queries, not a transfer of every job.

GPU memory is reported only when torch is already loaded in the serving process (embedded workers on a GPU); the
admin code never imports torch itself, so a CPU-only node does not pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from dicom_node.db import Database
from dicom_node.db.models import AuditEvent, DeliveryAttempt, Instance, Job, JobEvent, JobState, Study

PREFIX = "dicom_node"

# Bucket upper bounds in seconds, chosen around the targets in docs/benchmarks.md (seconds for a chest X-ray,
# tens of seconds for a brain MRI, minutes when a PACS is down and delivery retries).
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
DELIVERY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)
RECEIVE_TO_PACS_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1800, 3600)


def seconds_between(dialect: str, later: Any, earlier: Any) -> ColumnElement[Any]:
    """SQL for ``later - earlier`` in seconds on SQLite (ISO strings) and PostgreSQL (timestamptz)."""
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def _state(value: Any) -> str:
    return str(value.value if isinstance(value, JobState) else value)


def _histogram(
    session: Session,
    dialect: str,
    name: str,
    documentation: str,
    later: Any,
    earlier: Any,
    buckets: Sequence[float],
    extra_labels: dict[str, str] | None = None,
    join_study: bool = False,
) -> HistogramMetricFamily:
    """A histogram of ``later - earlier`` over jobs where both are set, labelled by detector."""
    extra_labels = extra_labels or {}
    duration = seconds_between(dialect, later, earlier)
    columns = [func.sum(case((duration <= bound, 1), else_=0)) for bound in buckets]
    query = select(Job.detector, func.count(Job.id), func.coalesce(func.sum(duration), 0.0), *columns)
    if join_study:
        query = query.join(Study, Job.study_id == Study.id)
    query = query.where(later.is_not(None), earlier.is_not(None), later >= earlier).group_by(Job.detector)
    family = HistogramMetricFamily(name, documentation, labels=["detector", *extra_labels])
    for detector, count, total, *cumulative in session.execute(query).all():
        points = [(_bound(b), float(c or 0)) for b, c in zip(buckets, cumulative, strict=True)]
        points.append(("+Inf", float(count)))
        family.add_metric([detector, *extra_labels.values()], points, sum_value=float(total or 0.0))
    return family


def _association_outcome(event: str) -> str:
    """``association_accepted`` → accepted; ``association_rejected`` / ``..._aborted`` → rejected."""
    if "reject" in event or "abort" in event:
        return "rejected"
    if "accept" in event:
        return "accepted"
    return event.removeprefix("association_")


def _bound(value: float) -> str:
    return repr(float(value))


class JobDatabaseCollector(Collector):
    """Collects the node's metrics from the job database on every scrape."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def collect(self) -> Iterator[Metric]:
        dialect = self._db.engine.dialect.name
        with self._db.session() as session:
            families = [
                *self._received(session),
                self._associations(session),
                *self._queue(session),
                *self._durations(session, dialect),
                *self._failures(session),
            ]
        yield from families
        yield from gpu_memory()

    @staticmethod
    def _received(session: Session) -> Iterable[Metric]:
        count, size, duplicates = session.execute(
            select(
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.size_bytes), 0),
                func.coalesce(func.sum(Instance.times_received - 1), 0),
            )
        ).one()
        instances = CounterMetricFamily(
            f"{PREFIX}_instances_received", "DICOM instances received and stored (each SOP Instance UID once)"
        )
        instances.add_metric([], float(count))
        yield instances
        received_bytes = CounterMetricFamily(f"{PREFIX}_received_bytes", "Bytes of DICOM instances stored")
        received_bytes.add_metric([], float(size))
        yield received_bytes
        dups = CounterMetricFamily(
            f"{PREFIX}_duplicate_instances_received", "Instances received again with a SOP Instance UID already stored"
        )
        dups.add_metric([], float(duplicates))
        yield dups
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Studies in the job database by state", labels=["state"])
        for state, n in session.execute(select(Study.state, func.count(Study.id)).group_by(Study.state)).all():
            studies.add_metric([str(state.value if hasattr(state, "value") else state)], float(n))
        yield studies

    @staticmethod
    def _associations(session: Session) -> Metric:
        """Associations by outcome and reason, from the audit events the SCP records."""
        family = CounterMetricFamily(
            f"{PREFIX}_associations",
            "DICOM associations by outcome (accepted, rejected) and rejection reason",
            labels=["outcome", "reason"],
        )
        rows = session.execute(
            select(AuditEvent.event, AuditEvent.reason, func.count(AuditEvent.id))
            .where(AuditEvent.event.like("association%"))
            .group_by(AuditEvent.event, AuditEvent.reason)
        ).all()
        totals: dict[tuple[str, str], float] = {}
        for event, reason, n in rows:
            outcome = (
                "rejected" if "reject" in event or "abort" in event else "accepted" if "accept" in event else event
            )
            key = (outcome, (reason or "") if outcome == "rejected" else "")
            totals[key] = totals.get(key, 0.0) + float(n)
        for (outcome, reason), count in sorted(totals.items()):
            family.add_metric([outcome, reason], count)
        return family

    @staticmethod
    def _queue(session: Session) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Jobs queued and not yet started, per detector", labels=["detector"]
        )
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by detector and state", labels=["detector", "state"])
        for detector, state, n in session.execute(
            select(Job.detector, Job.state, func.count(Job.id)).group_by(Job.detector, Job.state)
        ).all():
            jobs.add_metric([detector, _state(state)], float(n))
            if _state(state) == JobState.QUEUED.value:
                depth.add_metric([detector], float(n))
        yield depth
        yield jobs

    @staticmethod
    def _durations(session: Session, dialect: str) -> Iterable[Metric]:
        name = f"{PREFIX}_job_stage_duration_seconds"
        doc = (
            "Job duration per stage: queue_wait (queued → started), run (started → finished), "
            "delivery (finished → delivered)"
        )
        stages = [
            ("queue_wait", Job.started_at, func.coalesce(Job.queued_at, Job.created_at), QUEUE_WAIT_BUCKETS),
            ("run", Job.finished_at, Job.started_at, RUN_BUCKETS),
            ("delivery", Job.delivered_at, Job.finished_at, DELIVERY_BUCKETS),
        ]
        merged = HistogramMetricFamily(name, doc, labels=["detector", "stage"])
        for stage, later, earlier, buckets in stages:
            family = _histogram(session, dialect, name, doc, later, earlier, buckets, {"stage": stage})
            merged.samples.extend(family.samples)
        yield merged
        yield _histogram(
            session,
            dialect,
            f"{PREFIX}_receive_to_pacs_seconds",
            "Last instance of the study received → results stored at the destination (includes the quiet time)",
            Job.delivered_at,
            Study.last_received_at,
            RECEIVE_TO_PACS_BUCKETS,
            join_study=True,
        )

    @staticmethod
    def _failures(session: Session) -> Iterable[Metric]:
        """Failures by stage. Counted from the job events (monotonic even when a failed job is retried later),
        plus failed delivery attempts (each try that did not store)."""
        family = CounterMetricFamily(
            f"{PREFIX}_failures", "Job failures by stage (detect, delivery) and detector", labels=["stage", "detector"]
        )
        stage_of = {JobState.FAILED.value: "detect", JobState.DELIVERY_FAILED.value: "delivery"}
        rows = session.execute(
            select(JobEvent.to_state, Job.detector, func.count(JobEvent.id))
            .join(Job, JobEvent.job_id == Job.id)
            .where(JobEvent.to_state.in_(list(stage_of)))
            .group_by(JobEvent.to_state, Job.detector)
        ).all()
        for to_state, detector, n in rows:
            family.add_metric([stage_of[str(to_state)], detector], float(n))
        yield family
        attempts = CounterMetricFamily(
            f"{PREFIX}_delivery_attempts",
            "Delivery attempts by outcome (stored, warning, retry, failed)",
            labels=["outcome"],
        )
        for outcome, n in session.execute(
            select(DeliveryAttempt.outcome, func.count(DeliveryAttempt.id)).group_by(DeliveryAttempt.outcome)
        ).all():
            attempts.add_metric([outcome], float(n))
        yield attempts


def gpu_memory() -> Iterator[Metric]:
    """GPU memory of this process's CUDA devices, only when torch is already imported and CUDA initialised."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available() or not cuda.is_initialized():
        return
    allocated = GaugeMetricFamily(
        f"{PREFIX}_gpu_memory_allocated_bytes", "GPU memory held by tensors in this process", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        f"{PREFIX}_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator", labels=["device"]
    )
    total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory of the device", labels=["device"])
    for index in range(cuda.device_count()):
        label = [f"cuda:{index}"]
        allocated.add_metric(label, float(cuda.memory_allocated(index)))
        reserved.add_metric(label, float(cuda.memory_reserved(index)))
        total.add_metric(label, float(cuda.get_device_properties(index).total_memory))
    yield allocated
    yield reserved
    yield total


def make_registry(db: Database) -> CollectorRegistry:
    """A registry of its own per app (no global state), holding the job database collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobDatabaseCollector(db))
    return registry
