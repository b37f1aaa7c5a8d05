"""The admin actions the API exposes (retry a failed job, re-run a study, re-deliver results).

The API depends only on the ``AdminActions`` protocol; the job state machine that really performs them lives in
``dicom_node/jobs.py`` (workers), wired in by whoever builds the app (``dicom-node serve``).
"""

from __future__ import annotations

from typing import Protocol


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
