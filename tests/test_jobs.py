"""The job state machine on SQLite and PostgreSQL: idempotent scheduling, supersede, leases, admin actions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from workers_support import RecordingDispatcher, add_late_instance, make_study

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, JobEvent, JobState
from dicom_node.jobs import (
    JobScheduler,
    JobStateError,
    acquire_lease,
    complete_job,
    compute_result_key,
    fail_job,
    model_version,
    redeliver_job,
    renew_lease,
    rerun_study,
    retry_job,
    retry_later,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})


def jobs_of(db: Database) -> list[Job]:
    with db.session() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.id)))
        session.expunge_all()
        return jobs


def events_of(db: Database, job_id: int) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_result_key_ignores_instance_order() -> None:
    a = compute_result_key("1.2", "1.2.3", "brain_mri", "v1", ["1.5", "1.4"])
    assert a == compute_result_key("1.2", "1.2.3", "brain_mri", "v1", ["1.4", "1.5"])
    assert a != compute_result_key("1.2", "1.2.3", "brain_mri", "v2", ["1.4", "1.5"])
    assert a != compute_result_key("1.2", "1.2.3", "brain_mri", "v1", ["1.4", "1.5", "1.6"])


def test_model_version_from_model_card(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    settings = load_settings(overrides={"detectors": {"brain_mri": {"model_dir": str(model_dir)}}})
    assert model_version(settings, "brain_mri") == "unversioned"
    (model_dir / "model_card.json").write_text(json.dumps({"version": "2026.11-a"}))
    assert model_version(settings, "brain_mri") == "2026.11-a"


def test_schedule_is_idempotent_and_enqueues_after_commit(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    made = make_study(database, tmp_path / "s1")
    ignored = make_study(database, tmp_path / "s2", detector=None)
    dispatcher = RecordingDispatcher()
    scheduler = JobScheduler(database, settings, dispatcher)
    first = scheduler.on_study_complete(made.study_id)
    assert len(first) == 1
    assert scheduler.on_study_complete(made.study_id) == []  # completed again: no second job
    assert scheduler.on_study_complete(ignored.study_id) == []  # no series routed
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED and job.attempts == 0 and job.broker_task_id == f"task-{job.id}-1"
    assert dispatcher.detections == [(job.id, None)]
    assert events_of(database, job.id) == ["created"]


def test_late_instances_supersede(database: Database, settings: Settings, tmp_path: Path) -> None:
    made = make_study(database, tmp_path / "s1")
    dispatcher = RecordingDispatcher()
    scheduler = JobScheduler(database, settings, dispatcher)
    (old_id,) = scheduler.on_study_complete(made.study_id)
    add_late_instance(database, made, tmp_path / "s1")
    (new_id,) = scheduler.on_study_complete(made.study_id)
    old, new = jobs_of(database)
    assert (old.id, new.id) == (old_id, new_id)
    assert old.state == JobState.SUPERSEDED and new.state == JobState.QUEUED
    assert new.predecessor_job_id == old.id and old.result_key != new.result_key
    # A message for the superseded job that is still in the broker does nothing.
    assert acquire_lease(database, old_id, "w@h#1", 60) is None


def test_broker_down_leaves_job_queued(database: Database, settings: Settings, tmp_path: Path) -> None:
    made = make_study(database, tmp_path / "s1")
    (job_id,) = JobScheduler(database, settings, RecordingDispatcher(fail=True)).on_study_complete(made.study_id)
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED and job.broker_task_id is None


def test_lease_is_exclusive_and_counts_attempts(database: Database, settings: Settings, tmp_path: Path) -> None:
    made = make_study(database, tmp_path / "s1")
    (job_id,) = JobScheduler(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
    lease = acquire_lease(database, job_id, "celery@a#10", 60)
    assert lease is not None and lease.attempt == 1 and len(lease.file_paths) == 3
    assert acquire_lease(database, job_id, "celery@b#20", 60) is None  # held by a live lease
    assert renew_lease(database, lease, 60)
    assert complete_job(database, lease, series_score=0.3, image_threshold=0.5, is_abnormal=False, result_path="x")
    assert acquire_lease(database, job_id, "celery@b#20", 60) is None  # done: duplicate message dropped
    (job,) = jobs_of(database)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1 and job.worker == "celery@a#10"
    assert events_of(database, job_id) == ["created", "started", "succeeded"]


def test_expired_lease_is_taken_over_and_old_holder_loses(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    made = make_study(database, tmp_path / "s1")
    (job_id,) = JobScheduler(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
    stale = acquire_lease(database, job_id, "celery@a#10", -1)  # already expired
    assert stale is not None
    fresh = acquire_lease(database, job_id, "celery@b#20", 60)
    assert fresh is not None and fresh.attempt == 2
    assert not renew_lease(database, stale, 60)
    assert not complete_job(database, stale, series_score=1, image_threshold=0.5, is_abnormal=True, result_path="x")
    assert complete_job(database, fresh, series_score=0.1, image_threshold=0.5, is_abnormal=False, result_path="y")
    (job,) = jobs_of(database)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2 and job.result_path == "y"


def test_transient_errors_back_off_then_fail(database: Database, tmp_path: Path) -> None:
    settings = load_settings(overrides={"workers": {"max_attempts": 2, "retry_backoff_seconds": 0.01}})
    made = make_study(database, tmp_path / "s1")
    (job_id,) = JobScheduler(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
    lease = acquire_lease(database, job_id, "w@h#1", 60)
    assert lease is not None
    assert retry_later(database, settings, lease, "OSError: spool unreachable") == pytest.approx(0.01)
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED and job.next_attempt_at is not None
    lease = acquire_lease(database, job_id, "w@h#1", 60)
    assert lease is not None and lease.attempt == 2
    assert retry_later(database, settings, lease, "OSError: spool unreachable") is None
    (job,) = jobs_of(database)
    assert job.state == JobState.FAILED and "gave up after 2 attempts" in (job.error or "")


def test_admin_actions(database: Database, settings: Settings, tmp_path: Path) -> None:
    made = make_study(database, tmp_path / "s1")
    dispatcher = RecordingDispatcher()
    (job_id,) = JobScheduler(database, settings, dispatcher).on_study_complete(made.study_id)
    with pytest.raises(JobStateError):
        redeliver_job(database, dispatcher, job_id)
    lease = acquire_lease(database, job_id, "w@h#1", 60)
    assert lease is not None
    with pytest.raises(JobStateError):
        retry_job(database, dispatcher, job_id)  # running
    fail_job(database, lease, "DetectorError: not a brain")
    job = retry_job(database, dispatcher, job_id)
    assert job.state == JobState.QUEUED and job.error is None
    lease = acquire_lease(database, job_id, "w@h#1", 60)
    assert lease is not None and lease.attempt == 2
    complete_job(database, lease, series_score=0.1, image_threshold=0.5, is_abnormal=False, result_path="r")
    assert redeliver_job(database, dispatcher, job_id).state == JobState.SUCCEEDED
    assert dispatcher.deliveries == [job_id]
    # Re-running the same input queues the same job again: never a second result set.
    assert rerun_study(database, settings, dispatcher, made.study_uid) == [job_id]
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED
    assert events_of(database, job_id) == [
        "created", "started", "failed", "retry", "started", "succeeded", "redeliver", "rerun",
    ]
    with pytest.raises(JobStateError):
        rerun_study(database, settings, dispatcher, "1.2.3.4")


def test_cli_jobs_retry_sends_to_the_embedded_broker(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml
    from sqlalchemy import create_engine, text

    from dicom_node.cli import main

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "data")}, "database": {"url": sqlite_url}}))
    settings = load_settings(config)
    db = Database(sqlite_url)
    made = make_study(db, tmp_path / "s1")
    (job_id,) = JobScheduler(db, settings, RecordingDispatcher()).on_study_complete(made.study_id)
    lease = acquire_lease(db, job_id, "w@h#1", 60)
    assert lease is not None
    fail_job(db, lease, "DetectorError: not a brain")

    assert main(["jobs", "retry", str(job_id), "--config", str(config)]) == 0
    assert f"job {job_id} queued again (attempt 2); sent to the workers" in capsys.readouterr().out
    (job,) = jobs_of(db)
    assert job.state == JobState.QUEUED and job.broker_task_id
    broker = create_engine(f"sqlite:///{tmp_path / 'data' / 'broker' / 'broker.sqlite'}")
    with broker.connect() as connection:
        payloads = connection.execute(text("SELECT payload FROM kombu_message")).scalars().all()
    broker.dispose()
    assert len(payloads) == 1 and job.broker_task_id in payloads[0]

    lease = acquire_lease(db, job_id, "w@h#1", 60)
    assert lease is not None
    complete_job(db, lease, series_score=0.1, image_threshold=0.5, is_abnormal=False, result_path="r")
    assert main(["jobs", "retry", str(job_id), "--config", str(config)]) == 1
    assert "only failed or queued jobs can be retried" in capsys.readouterr().err
    db.dispose()
