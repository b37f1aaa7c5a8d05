"""Realistic job-database rows for the admin tests: what the receive, worker and delivery paths write.

Six studies from three modalities/senders covering every state the admin surface shows: a normal brain MRI
delivered after one retry, an abnormal chest X-ray delivered, a brain MRI whose detection failed, a chest X-ray whose
delivery was refused by the PACS, a study still receiving, and a queued job; plus association audit events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydicom.uid import generate_uid

from dicom_node.db import (
    AuditEvent,
    Database,
    DeliveryAttempt,
    Instance,
    Job,
    JobEvent,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyState,
)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG2000 = "1.2.840.10008.1.2.4.91"
SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.34"

DETECTION_ERROR = "DetectorError: series has 3 slices; brain_mri needs at least 16 contiguous axial slices"
DELIVERY_ERROR = "ORTHANC@127.0.0.1:4242 refused the SEG: status 0xC000 (cannot understand)"


@dataclass
class Rows:
    """Ids and UIDs of what ``fill`` wrote, for the tests to assert on."""

    now: datetime
    studies: dict[str, str] = field(default_factory=dict)  # name → Study Instance UID
    jobs: dict[str, int] = field(default_factory=dict)  # name → job id


def _study(session, uid, ae, modalities, state, received, count, completed=None) -> Study:  # type: ignore[no-untyped-def]
    study = Study(
        study_instance_uid=uid,
        accession_number=f"ACC{abs(hash(uid)) % 10**7:07d}",
        modalities=modalities,
        calling_ae_title=ae,
        state=state,
        first_received_at=received,
        last_received_at=received + timedelta(seconds=max(count - 1, 0) * 0.05),
        completed_at=completed,
        completion_reason="quiet for 30 s" if completed else None,
        completion_count=1 if completed else 0,
        instance_count=count,
    )
    session.add(study)
    session.flush()
    return study


def _series(session, study, modality, description, count, received, detector, reason, sop, ts, ae):  # type: ignore[no-untyped-def]
    series = Series(
        study_id=study.id,
        series_instance_uid=generate_uid(),
        modality=modality,
        series_number=len(study.series) + 1,
        series_description=description,
        body_part_examined="BRAIN" if modality == "MR" else "CHEST",
        view_position=None if modality == "MR" else "PA",
        image_type="ORIGINAL\\PRIMARY",
        sop_class_uid=sop,
        rows=256 if modality == "MR" else 2048,
        columns=256 if modality == "MR" else 2048,
        instance_count=count,
        detector=detector,
        routing_rule=detector and ("brain-mr" if detector == "brain_mri" else "frontal-chest"),
        routing_reason=reason,
        routed_at=received + timedelta(seconds=31),
    )
    session.add(series)
    session.flush()
    for number in range(1, count + 1):
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=generate_uid(),
                sop_class_uid=sop,
                transfer_syntax_uid=ts,
                instance_number=number,
                file_path=f"/data/spool/{study.study_instance_uid}/{series.series_instance_uid}/{number}.dcm",
                size_bytes=140_000 if modality == "MR" else 4_500_000,
                calling_ae_title=ae,
                peer_host="10.0.0.17",
                received_at=received + timedelta(seconds=(number - 1) * 0.05),
            )
        )
    session.flush()
    return series


def _attempt(session, job, attempt, started, seconds, outcome, status, detail=None) -> datetime:  # type: ignore[no-untyped-def]
    """One C-STORE delivery attempt to the test PACS; returns when it finished."""
    finished = started + timedelta(seconds=seconds)
    session.add(
        DeliveryAttempt(
            job_id=job.id,
            destination="ORTHANC@127.0.0.1:4242",
            attempt=attempt,
            started_at=started,
            finished_at=finished,
            outcome=outcome,
            status=status,
            detail=detail,
        )
    )
    return finished


def _event(session, job, at, from_state, to_state, event, detail=None) -> None:  # type: ignore[no-untyped-def]
    session.add(JobEvent(job_id=job.id, at=at, from_state=from_state, to_state=to_state, event=event, detail=detail))


def _finished_and_delivered(session, job, detail) -> None:  # type: ignore[no-untyped-def]
    _event(session, job, job.finished_at, "running", "succeeded", "finished", detail)
    _event(session, job, job.delivered_at, "succeeded", "delivered", "delivered")


def _job(session, study, series, detector, state, completed, *, run_s, wait_s=0.2, **extra):  # type: ignore[no-untyped-def]
    queued = completed + timedelta(seconds=0.05)
    started = queued + timedelta(seconds=wait_s) if state != JobState.QUEUED else None
    finished = started + timedelta(seconds=run_s) if started is not None else None
    job = Job(
        study_id=study.id,
        series_id=series.id,
        detector=detector,
        model_version="1.0.0",
        instance_set_hash=generate_uid()[-40:].replace(".", "0"),
        result_key=generate_uid()[-60:].replace(".", "0"),
        state=state,
        attempts=1 if started else 0,
        worker="celery@worker-a" if started else None,
        study_completed_at=completed,
        created_at=queued,
        queued_at=queued,
        started_at=started,
        finished_at=finished,
        **extra,
    )
    session.add(job)
    session.flush()
    _event(session, job, queued, None, "queued", "queued")
    if started:
        _event(session, job, started, "queued", "running", "started", "celery@worker-a")
    return job


def fill(db: Database, now: datetime | None = None) -> Rows:
    """Write the six studies (received within the last 3 hours) and return their UIDs and job ids."""
    now = now or datetime.now(UTC)
    rows = Rows(now=now)
    with db.session() as s:
        # 1. Normal brain MRI: delivered on the second attempt (PACS busy on the first).
        t0 = now - timedelta(hours=3)
        completed = t0 + timedelta(seconds=40)
        study = _study(s, generate_uid(), "MRSCANNER1", "MR", StudyState.COMPLETE, t0, 24, completed)
        _series(s, study, "MR", "localizer", 3, t0, None, "localizer", MR_IMAGE, EXPLICIT_LE, "MRSCANNER1")
        t1 = _series(s, study, "MR", "t1_mprage_sag", 21, t0, "brain_mri", None, MR_IMAGE, EXPLICIT_LE, "MRSCANNER1")
        job = _job(
            s,
            study,
            t1,
            "brain_mri",
            JobState.DELIVERED,
            completed,
            run_s=14.0,
            series_score=0.21,
            image_threshold=0.5,
            is_abnormal=False,
            result_path="/data/results/job-1",
        )
        assert job.finished_at is not None
        first = job.finished_at + timedelta(seconds=0.3)
        _attempt(s, job, 1, first, 0.4, "retry", 0xA700, "out of resources")
        job.delivered_at = _attempt(s, job, 2, first + timedelta(seconds=2.5), 0.8, "stored", 0)
        for kind, sop in (("SEG", SEG_SOP), ("SR", SR_SOP)):
            s.add(
                ResultObject(
                    job_id=job.id,
                    kind=kind,
                    sop_class_uid=sop,
                    sop_instance_uid=generate_uid(),
                    series_instance_uid=generate_uid(),
                    file_path=f"/data/results/job-1/{kind}.dcm",
                    created_at=job.finished_at + timedelta(seconds=0.2),
                )
            )
        _finished_and_delivered(s, job, "normal, score 0.21")
        rows.studies["brain_normal"], rows.jobs["brain_normal"] = study.study_instance_uid, job.id

        # 2. Abnormal chest X-ray (JPEG 2000), delivered: the triage case, received most recently but one.
        t0 = now - timedelta(hours=1)
        completed = t0 + timedelta(seconds=30)
        study = _study(s, generate_uid(), "CR_ROOM2", "CR", StudyState.COMPLETE, t0, 1, completed)
        cxr = _series(s, study, "CR", "CHEST PA", 1, t0, "chest_xray", None, CR_IMAGE, JPEG2000, "CR_ROOM2")
        job = _job(
            s,
            study,
            cxr,
            "chest_xray",
            JobState.DELIVERED,
            completed,
            run_s=1.2,
            urgent=True,
            series_score=0.93,
            image_threshold=0.6,
            is_abnormal=True,
            result_path="/data/results/job-2",
        )
        assert job.finished_at is not None
        job.delivered_at = _attempt(s, job, 1, job.finished_at + timedelta(seconds=0.2), 0.5, "stored", 0)
        _finished_and_delivered(s, job, "abnormal, score 0.93")
        rows.studies["chest_abnormal"], rows.jobs["chest_abnormal"] = study.study_instance_uid, job.id

        # 3. Brain MRI whose detection failed (too few slices).
        t0 = now - timedelta(hours=2)
        completed = t0 + timedelta(seconds=30)
        study = _study(s, generate_uid(), "MRSCANNER1", "MR", StudyState.COMPLETE, t0, 3, completed)
        short = _series(s, study, "MR", "t2_tse_tra", 3, t0, "brain_mri", None, MR_IMAGE, EXPLICIT_LE, "MRSCANNER1")
        job = _job(s, study, short, "brain_mri", JobState.FAILED, completed, run_s=0.4, error=DETECTION_ERROR)
        _event(s, job, job.finished_at, "running", "failed", "failed", DETECTION_ERROR)
        rows.studies["brain_failed"], rows.jobs["brain_failed"] = study.study_instance_uid, job.id

        # 4. Normal chest X-ray whose delivery the PACS refused (0xC000, no retry).
        t0 = now - timedelta(minutes=90)
        completed = t0 + timedelta(seconds=30)
        study = _study(s, generate_uid(), "DX_ER", "DX", StudyState.COMPLETE, t0, 1, completed)
        dx = _series(s, study, "DX", "CHEST AP", 1, t0, "chest_xray", None, CR_IMAGE, EXPLICIT_LE, "DX_ER")
        job = _job(
            s,
            study,
            dx,
            "chest_xray",
            JobState.DELIVERY_FAILED,
            completed,
            run_s=1.1,
            series_score=0.12,
            image_threshold=0.6,
            is_abnormal=False,
            error=DELIVERY_ERROR,
        )
        assert job.finished_at is not None
        refused = _attempt(
            s, job, 1, job.finished_at + timedelta(seconds=0.2), 0.3, "failed", 0xC000, "cannot understand"
        )
        _event(s, job, job.finished_at, "running", "succeeded", "finished")
        _event(s, job, refused, "succeeded", "delivery_failed", "delivery_failed", DELIVERY_ERROR)
        rows.studies["chest_delivery_failed"], rows.jobs["chest_delivery_failed"] = study.study_instance_uid, job.id

        # 5. A study still receiving (no jobs yet), the most recent.
        t0 = now - timedelta(seconds=20)
        study = _study(s, generate_uid(), "MRSCANNER1", "MR", StudyState.RECEIVING, t0, 4)
        _series(s, study, "MR", "flair_tra", 4, t0, None, None, MR_IMAGE, EXPLICIT_LE, "MRSCANNER1")
        rows.studies["receiving"] = study.study_instance_uid

        # 6. A chest X-ray queued behind the others.
        t0 = now - timedelta(minutes=5)
        completed = t0 + timedelta(seconds=30)
        study = _study(s, generate_uid(), "CR_ROOM2", "CR", StudyState.COMPLETE, t0, 1, completed)
        queued = _series(s, study, "CR", "CHEST PA", 1, t0, "chest_xray", None, CR_IMAGE, JPEG2000, "CR_ROOM2")
        job = _job(s, study, queued, "chest_xray", JobState.QUEUED, completed, run_s=0)
        rows.studies["chest_queued"], rows.jobs["chest_queued"] = study.study_instance_uid, job.id

        for minutes, event, ae, reason in [
            (180, "association_accepted", "MRSCANNER1", None),
            (120, "association_accepted", "MRSCANNER1", None),
            (90, "association_accepted", "DX_ER", None),
            (60, "association_accepted", "CR_ROOM2", None),
            (50, "association_rejected", "UNKNOWN_AE", "calling AE title not allowed"),
            (40, "association_rejected", "UNKNOWN_AE", "calling AE title not allowed"),
            (30, "association_rejected", "MRSCANNER1", "called AE title not recognised"),
            (5, "association_accepted", "CR_ROOM2", None),
        ]:
            s.add(
                AuditEvent(
                    at=now - timedelta(minutes=minutes),
                    event=event,
                    calling_ae_title=ae,
                    called_ae_title="DICOMNODE",
                    peer_host="10.0.0.17",
                    reason=reason,
                )
            )
    return rows
