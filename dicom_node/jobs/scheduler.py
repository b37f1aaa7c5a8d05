"""Scheduling: turns completed studies into detection jobs, one per routed series, idempotently (``result_key``).

A series whose instance set or model version changed since its last job gets a new job; the old one is superseded
and the new one points to it with ``predecessor_job_id``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Database, Instance, Job, JobState, Study
from dicom_node.jobs.dispatch import Dispatcher, send_detection
from dicom_node.jobs.identity import ModelVersions, compute_result_key, instance_set_hash
from dicom_node.jobs.lifecycle import create_queued, requeued_fields, transition
from dicom_node.jobs.urgency import NORMAL_PRIORITY, URGENT_PRIORITY, is_urgent
from dicom_node.timeutil import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _SeriesInput:
    series_id: int
    series_instance_uid: str
    detector: str
    sop_instance_uids: tuple[str, ...]
    urgent: bool


class JobScheduler:
    """Turns completed studies into detection jobs; registered as an ``on_study_complete`` callback.

    ``model_version`` gives a detector's model version (part of the result key); it comes from the composition
    root, so the scheduler never reads the model code or its weights."""

    def __init__(
        self, db: Database, settings: Settings, dispatcher: Dispatcher, *, model_version: ModelVersions
    ) -> None:
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.model_version = model_version

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
            version = versions.setdefault(item.detector, self.model_version(item.detector))
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
        job = create_queued(
            session,
            detail=f"{len(item.sop_instance_uids)} instances, model {version}" + (", urgent" if item.urgent else ""),
            study_id=study.id,
            series_id=item.series_id,
            detector=item.detector,
            model_version=version,
            instance_set_hash=instance_set_hash(item.sop_instance_uids),
            result_key=key,
            priority=URGENT_PRIORITY if item.urgent else NORMAL_PRIORITY,
            urgent=item.urgent,
            attempts=0,
            study_completed_at=study.completed_at,
            created_at=now,
            queued_at=now,
            predecessor_job_id=previous[-1].id if previous else None,
        )
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
        **requeued_fields(),
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
        **requeued_fields(),
    )
