"""The admin's actions on jobs: retry a failed job, re-run a study, redeliver a job's results.

Each is a transition of the lifecycle (``dicom_node.jobs.lifecycle``) followed, after the commit, by the broker
message; a job whose state does not allow the action raises ``JobStateError`` with the reason."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Database, Job, JobState, Study
from dicom_node.jobs.dispatch import Dispatcher, send_delivery, send_detection
from dicom_node.jobs.identity import ModelVersions
from dicom_node.jobs.lifecycle import DELIVERABLE_STATES, JobStateError, record_event, requeued_fields, transition
from dicom_node.jobs.scheduler import JobScheduler


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
                **requeued_fields(),
            ):
                raise JobStateError(f"job {job_id} changed state meanwhile; try again")
        elif job.state == JobState.QUEUED:
            record_event(session, job_id, "resend", detail="retry requested while queued: message sent again")
        else:
            raise JobStateError(f"job {job_id} is {job.state.value}; only failed or queued jobs can be retried")
    send_detection(db, dispatcher, [job_id])
    return _fresh(db, job_id)


def rerun_study(
    db: Database, settings: Settings, dispatcher: Dispatcher, study_uid: str, *, model_version: ModelVersions
) -> list[int]:
    """Run the detectors on a study again; returns the ids of the jobs queued.

    Series whose result key is unchanged re-run the same job (its result set is overwritten, never duplicated);
    series whose instance set or model version changed get a new job that supersedes the old one."""
    with db.session() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if study_id is None:
        raise JobStateError(f"study {study_uid} is not in the job database")
    job_ids = JobScheduler(db, settings, dispatcher, model_version=model_version).schedule(study_id, rerun=True)
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
