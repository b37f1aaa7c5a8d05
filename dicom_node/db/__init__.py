"""Job database: typed ORM models, engine/session factory and Alembic migrations."""

from dicom_node.db.models import (
    AuditEvent,
    Base,
    DeliveryAttempt,
    Instance,
    Job,
    JobEvent,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyState,
    WorkerHeartbeat,
)
from dicom_node.db.session import Database, migrate

__all__ = [
    "AuditEvent",
    "Base",
    "Database",
    "DeliveryAttempt",
    "Instance",
    "Job",
    "JobEvent",
    "JobState",
    "ResultObject",
    "Series",
    "Study",
    "StudyState",
    "WorkerHeartbeat",
    "migrate",
]
