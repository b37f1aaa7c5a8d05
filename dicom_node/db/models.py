"""Job database schema (SQLAlchemy 2 typed ORM). Changes go through Alembic migrations in ``migrations/``.

The database is the source of truth: what came in (studies, series, instances), what was decided (routing,
completion), what ran (jobs and their events), what was produced (results) and sent (delivery attempts), and who
talked to the node (audit events). Patient names and IDs are never stored here beyond what is needed to find a
study; logs never carry them.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dicom_node.timeutil import utcnow

UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters.
AE = String(16)


class Base(DeclarativeBase):
    pass


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    """Detection job lifecycle: queued → running → succeeded | failed; succeeded → delivered | delivery_failed.

    ``superseded`` marks a job replaced by a re-run of the same series with a different instance set."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    SUPERSEDED = "superseded"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    modalities: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(AE)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), default=StudyState.RECEIVING, index=True
    )
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completion_reason: Mapped[str | None] = mapped_column(Text)
    completion_count: Mapped[int] = mapped_column(Integer, default=0)
    needs_reprocessing: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Associations that delivered instances of this study and have not ended yet; still above zero when the node
    # starts means the node stopped during them (kill -9, power cut).
    open_associations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when an association delivering the study ended abnormally (A-ABORT, reset, node stopped): the quiet
    # timer alone does not complete it until completion.interrupted_grace_seconds, so a resend makes one job.
    interrupted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    interruption_reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    image_type: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    detector: Mapped[str | None] = mapped_column(String(32))
    routing_rule: Mapped[str | None] = mapped_column(String(64))
    routing_reason: Mapped[str | None] = mapped_column(Text)
    routed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(AE)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    last_duplicate_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    after_completion: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One detection of one series by one detector and model version over one set of instances.

    ``result_key`` (study, series, detector, model version, instance set) is unique, so a re-run never creates a
    second result set for the same input."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    detector: Mapped[str] = mapped_column(String(32), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    instance_set_hash: Mapped[str] = mapped_column(String(64))
    result_key: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.QUEUED, index=True
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    broker_task_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    study_completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    series_score: Mapped[float | None] = mapped_column(Float)
    image_threshold: Mapped[float | None] = mapped_column(Float)
    is_abnormal: Mapped[bool | None] = mapped_column(Boolean)
    result_path: Mapped[str | None] = mapped_column(Text)
    predecessor_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))

    study: Mapped[Study] = relationship(back_populates="jobs")
    series: Mapped[Series] = relationship()
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", order_by="ResultObject.id")
    deliveries: Mapped[list[DeliveryAttempt]] = relationship(back_populates="job", order_by="DeliveryAttempt.id")


class JobEvent(Base):
    """A job's timeline: every state change and notable step, with when and why."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="events")


class ResultObject(Base):
    """A DICOM object the node created for a job (SEG, SR, PM, SC)."""

    __tablename__ = "result_objects"
    __table_args__ = (UniqueConstraint("sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    file_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class DeliveryAttempt(Base):
    """One attempt to send a job's results to one destination (or one webhook POST)."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16))  # stored, warning, retry, failed
    status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status or HTTP status
    detail: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class WorkerHeartbeat(Base):
    """A worker's liveness, written by the worker's main process every ``workers.heartbeat_seconds``.

    ``processes`` lists the pool process ids alive when ``beat_at`` was taken; ``held`` the broker messages the
    worker holds (reserved or running: task, job id, task id, delivery tag). A job whose holder (``node#pid``) is
    missing from a fresh beat, or whose worker stopped beating, is re-queued (docs/workers.md)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # Celery node name, e.g. gpu1@host
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str | None] = mapped_column(String(256))
    processes: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of pool process ids
    held: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of {task, job, id, tag}
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stop_reason: Mapped[str | None] = mapped_column(Text)


class AuditEvent(Base):
    """Who talked to the node: associations accepted or rejected (with the reason), and other security events."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(AE)
    called_ae_title: Mapped[str | None] = mapped_column(AE)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
