"""The admin actions the API exposes (retry a failed job, re-run a study, re-deliver results).

The API depends only on the ``AdminActions`` protocol; the job state machine that really performs them lives in
``dicom_node/jobs/`` (workers), wired in by whoever builds the app (``dicom-node serve``).
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.db import Database, Job, JobState, Study
from dicom_node.jobs.actions import redeliver_job, rerun_study, retry_job
from dicom_node.jobs.dispatch import Dispatcher
from dicom_node.jobs.identity import ModelVersions
from dicom_node.jobs.lifecycle import JobStateError


class ActionError(Exception):
    """An action cannot be done in the job's or study's current state (HTTP 409); the message says why."""


class AdminActions(Protocol):
    """What the admin API can ask the job state machine to do. Each returns the ids of the jobs it queued."""

    def retry_job(self, job_id: int) -> list[int]:
        """Queue a failed job again. LookupError if it does not exist, ActionError if it is not failed."""
        ...

    def rerun_study(self, study_instance_uid: str) -> list[int]:
        """Run every selected series of a study again (new jobs where the input changed)."""
        ...

    def redeliver_job(self, job_id: int) -> list[int]:
        """Send a job's results to the destinations again."""
        ...


class JobActions:
    """``AdminActions`` over the job state machine (``dicom_node.jobs``) and a broker ``Dispatcher``.

    "Retry" means "do again what failed": a job failed in detection is queued for detection again
    (``retry_job``); a job whose delivery failed is delivered again (``redeliver_job``). ``model_version`` gives
    the detectors' model versions for a re-run (part of the result key)."""

    def __init__(
        self, db: Database, settings: Settings, dispatcher: Dispatcher, *, model_version: ModelVersions
    ) -> None:
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.model_version = model_version

    def _state(self, job_id: int) -> JobState:
        with self.db.session() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is None:
            raise LookupError(f"job {job_id} not found")
        return JobState(state)

    def retry_job(self, job_id: int) -> list[int]:
        try:
            if self._state(job_id) == JobState.DELIVERY_FAILED:
                return [redeliver_job(self.db, self.dispatcher, job_id).id]
            return [retry_job(self.db, self.dispatcher, job_id).id]
        except JobStateError as err:
            raise ActionError(str(err)) from None

    def rerun_study(self, study_instance_uid: str) -> list[int]:
        with self.db.session() as session:
            if session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid)) is None:
                raise LookupError(f"study {study_instance_uid} not found")
        try:
            return rerun_study(
                self.db, self.settings, self.dispatcher, study_instance_uid, model_version=self.model_version
            )
        except JobStateError as err:
            raise ActionError(str(err)) from None

    def redeliver_job(self, job_id: int) -> list[int]:
        self._state(job_id)
        try:
            return [redeliver_job(self.db, self.dispatcher, job_id).id]
        except JobStateError as err:
            raise ActionError(str(err)) from None
