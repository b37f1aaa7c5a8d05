"""The one place that changes ``Job.state``: the table of allowed transitions, the compare-and-set and its event.

Every transition is a compare-and-set ``UPDATE ... WHERE id = :id AND state = :expected`` (plus the lease holder for
a running job) and is recorded as a ``JobEvent`` in the same transaction, so two schedulers, two sweepers or two
workers that race never both win, and the admin timeline shows every step. A transition the table does not allow
is a programming error: it raises ``JobStateError`` before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from dicom_node.db import Job, JobEvent, JobState
from dicom_node.timeutil import utcnow

_QUEUED, _RUNNING, _SUCCEEDED, _FAILED = JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED
_DELIVERED, _DELIVERY_FAILED, _SUPERSEDED = JobState.DELIVERED, JobState.DELIVERY_FAILED, JobState.SUPERSEDED

# from state → the states it may move to (the diagram in ``dicom_node.jobs``). running → running is a take-over (the
# holder is gone); delivery_failed → delivery_failed records another failed delivery of a job whose delivery had
# failed before (the pipeline records every failed build); any state but superseded may be superseded by a newer
# instance set or model version.
ALLOWED: Mapping[JobState, frozenset[JobState]] = {
    # lease taken
    _QUEUED: frozenset({_RUNNING, _SUPERSEDED}),
    # taken over; done; failed for good; back to queued (retry, holder gone)
    _RUNNING: frozenset({_RUNNING, _SUCCEEDED, _FAILED, _QUEUED, _SUPERSEDED}),
    # delivered or not; re-run
    _SUCCEEDED: frozenset({_DELIVERED, _DELIVERY_FAILED, _QUEUED, _SUPERSEDED}),
    # redeliver; a later delivery of it that failed; re-run
    _DELIVERED: frozenset({_SUCCEEDED, _DELIVERY_FAILED, _QUEUED, _SUPERSEDED}),
    # redeliver; delivered on a later attempt; failed again; re-run
    _DELIVERY_FAILED: frozenset({_SUCCEEDED, _DELIVERED, _DELIVERY_FAILED, _QUEUED, _SUPERSEDED}),
    # retry or re-run
    _FAILED: frozenset({_QUEUED, _SUPERSEDED}),
    # reactivated: its instance set and model version are current again
    _SUPERSEDED: frozenset({_QUEUED}),
}

# States in which a job still stands for the current result of its series (not replaced, not abandoned).
ACTIVE_STATES = frozenset({_QUEUED, _RUNNING, _SUCCEEDED, _DELIVERED, _DELIVERY_FAILED})
DELIVERABLE_STATES = frozenset({_SUCCEEDED, _DELIVERED, _DELIVERY_FAILED})


class JobStateError(Exception):
    """An action that the job's current state does not allow (e.g. retrying a running job)."""


def check_allowed(from_state: JobState, to_state: JobState) -> None:
    """Raise ``JobStateError`` unless the table allows ``from_state → to_state``."""
    if to_state not in ALLOWED[from_state]:
        raise JobStateError(f"a job cannot go from {from_state.value} to {to_state.value}")


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
    someone else moved it first. Raises ``JobStateError`` when the table does not allow the transition."""
    check_allowed(expected, to_state)
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


def move(session: Session, job: Job, to_state: JobState, event: str, *, detail: str | None = None) -> bool:
    """``transition`` for a job loaded in ``session``: from the state it was loaded in; on success the loaded
    object shows the new state too (the compare-and-set bypasses the session, so it is set here without marking
    the object changed)."""
    moved = transition(session, job.id, job.state, to_state, event, detail=detail)
    if moved:
        set_committed_value(job, "state", to_state)
    return moved


def create_queued(session: Session, *, detail: str, **fields: Any) -> Job:
    """Insert a new job in ``queued`` and record its ``created`` event. The flush makes a concurrent scheduler with
    the same ``result_key`` fail here (unique) so that it re-reads."""
    job = Job(state=JobState.QUEUED, **fields)
    session.add(job)
    session.flush()
    record_event(session, job.id, "created", to_state=JobState.QUEUED, detail=detail)
    return job


def requeued_fields() -> dict[str, Any]:
    """Columns a job gets when it goes back to ``queued``: no message, holder, lease or error from before."""
    return {
        "broker_task_id": None,
        "queued_at": utcnow(),
        "next_attempt_at": None,
        "error": None,
        "worker": None,
        "lease_expires_at": None,
    }
