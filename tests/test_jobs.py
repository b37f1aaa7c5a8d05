"""The job state machine on SQLite and PostgreSQL: idempotent scheduling, supersede, leases, admin actions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select
from workers_support import RecordingDispatcher, add_late_instance, make_study

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, JobEvent, JobState
from dicom_node.jobs.actions import redeliver_job, rerun_study, retry_job
from dicom_node.jobs.dispatch import Dispatcher
from dicom_node.jobs.identity import compute_result_key
from dicom_node.jobs.leases import acquire_lease, complete_job, fail_job, renew_lease, retry_later
from dicom_node.jobs.lifecycle import JobStateError
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.workers.versions import model_card_versions


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})


def scheduler_for(db: Database, settings: Settings, dispatcher: Dispatcher) -> JobScheduler:
    """The scheduler as the node builds it: model versions from the model cards."""
    return JobScheduler(db, settings, dispatcher, model_version=model_card_versions(settings))


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
    assert model_card_versions(settings)("brain_mri") == "unversioned"
    (model_dir / "model_card.json").write_text(json.dumps({"version": "2026.11-a"}))
    assert model_card_versions(settings)("brain_mri") == "2026.11-a"


def test_schedule_is_idempotent_and_enqueues_after_commit(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    made = make_study(database, tmp_path / "s1")
    ignored = make_study(database, tmp_path / "s2", detector=None)
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
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
    scheduler = scheduler_for(database, settings, dispatcher)
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
    (job_id,) = scheduler_for(database, settings, RecordingDispatcher(fail=True)).on_study_complete(made.study_id)
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED and job.broker_task_id is None


def test_lease_is_exclusive_and_counts_attempts(database: Database, settings: Settings, tmp_path: Path) -> None:
    made = make_study(database, tmp_path / "s1")
    (job_id,) = scheduler_for(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
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
    (job_id,) = scheduler_for(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
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
    (job_id,) = scheduler_for(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
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
    (job_id,) = scheduler_for(database, settings, dispatcher).on_study_complete(made.study_id)
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
    again = rerun_study(database, settings, dispatcher, made.study_uid, model_version=model_card_versions(settings))
    assert again == [job_id]
    (job,) = jobs_of(database)
    assert job.state == JobState.QUEUED
    assert events_of(database, job_id) == [
        "created",
        "started",
        "failed",
        "retry",
        "started",
        "succeeded",
        "redeliver",
        "rerun",
    ]
    with pytest.raises(JobStateError):
        rerun_study(database, settings, dispatcher, "1.2.3.4", model_version=model_card_versions(settings))


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
    (job_id,) = scheduler_for(db, settings, RecordingDispatcher()).on_study_complete(made.study_id)
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
    # The sweeper sees the message waiting there (a queued job, not a lost one).
    from dicom_node.workers.inspect import inspector_for

    snapshot = inspector_for(f"sqlite:///{tmp_path / 'data' / 'broker' / 'broker.sqlite'}").snapshot()  # type: ignore[union-attr]
    assert snapshot is not None and snapshot.pending() == {("dicom_node.detect", job_id)}

    lease = acquire_lease(db, job_id, "w@h#1", 60)
    assert lease is not None
    complete_job(db, lease, series_score=0.1, image_threshold=0.5, is_abnormal=False, result_path="r")
    assert main(["jobs", "retry", str(job_id), "--config", str(config)]) == 1
    assert "only failed or queued jobs can be retried" in capsys.readouterr().err
    db.dispose()


def test_sweeper_requeues_expired_leases_and_resends_lost_messages(database: Database, tmp_path: Path) -> None:
    from datetime import timedelta

    from dicom_node.jobs.sweeper import Sweeper
    from dicom_node.timeutil import utcnow

    settings = load_settings(overrides={"workers": {"max_attempts": 2, "requeue_after_seconds": 60}})
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
    lost = scheduler.on_study_complete(make_study(database, tmp_path / "a").study_id)[0]
    dead = scheduler.on_study_complete(make_study(database, tmp_path / "b").study_id)[0]
    fresh = scheduler.on_study_complete(make_study(database, tmp_path / "c").study_id)[0]
    assert acquire_lease(database, dead, "celery@gone#1", 5) is not None
    sweepers = [
        Sweeper(database, settings, dispatcher, model_version=model_card_versions(settings)),
        Sweeper(database, settings, dispatcher, model_version=model_card_versions(settings)),
    ]
    dispatcher.detections.clear()

    assert not sweepers[0].sweep_once()  # nothing is late yet
    later = utcnow() + timedelta(seconds=61)
    first, second = (sweeper.sweep_once(later) for sweeper in sweepers)
    # Two sweepers (two nodes) at the same moment: each job is re-queued or re-sent once.
    assert sorted(first.lease_expired + second.lease_expired) == [dead]
    assert sorted(first.resent + second.resent) == [lost, fresh]
    assert sorted(job_id for job_id, _ in dispatcher.detections) == sorted([lost, dead, fresh])
    assert events_of(database, dead)[-1] == "lease_expired"
    assert events_of(database, lost)[-1] == "resend"

    # A study completed without its jobs (the node stopped between completion and scheduling) is scheduled.
    orphan = make_study(database, tmp_path / "d")
    assert sweepers[0].sweep_once().scheduled == []  # completed just now: the callback may still be running
    report = sweepers[0].sweep_once(utcnow() + timedelta(seconds=61))
    assert len(report.scheduled) == 1 and report.scheduled[0] not in (lost, dead, fresh)
    assert sweepers[1].sweep_once(utcnow() + timedelta(seconds=61)).scheduled == []
    assert orphan.study_id in {job.study_id for job in jobs_of(database)}

    # The second lost lease spends the last attempt: failed with the reason.
    assert acquire_lease(database, dead, "celery@gone#1", 5) is not None
    report = sweepers[0].sweep_once(utcnow() + timedelta(seconds=10))
    assert report.failed == [dead]
    job = next(job for job in jobs_of(database) if job.id == dead)
    assert job.state == JobState.FAILED and "worker lost" in (job.error or "") and job.attempts == 2


def test_dead_holder_on_the_same_node_is_taken_over_at_once(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    import subprocess
    import sys

    made = make_study(database, tmp_path / "s1")
    (job_id,) = scheduler_for(database, settings, RecordingDispatcher()).on_study_complete(made.study_id)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    assert acquire_lease(database, job_id, f"celery@h#{dead_pid}", 600) is not None
    assert acquire_lease(database, job_id, "celery@other#1", 600) is None  # another node cannot tell: waits
    lease = acquire_lease(database, job_id, f"celery@h#{os.getpid()}", 600)
    assert lease is not None and lease.attempt == 2
    assert events_of(database, job_id)[-1] == "taken_over"


def test_urgent_rules_set_priority(database: Database, tmp_path: Path) -> None:
    settings = load_settings(overrides={"workers": {"urgent_rules": [{"name": "er", "calling_ae_title": ["er_ct"]}]}})
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
    normal = scheduler.on_study_complete(make_study(database, tmp_path / "a").study_id)[0]
    urgent = scheduler.on_study_complete(make_study(database, tmp_path / "b", calling_ae_title="ER_CT").study_id)[0]
    jobs = {job.id: job for job in jobs_of(database)}
    assert (jobs[normal].urgent, jobs[normal].priority) == (False, 5)
    assert (jobs[urgent].urgent, jobs[urgent].priority) == (True, 0)


def test_device_resolution() -> None:
    from dicom_node.workers.context import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1", 3) == "cuda:1"
    import torch

    if not torch.cuda.is_available():
        assert resolve_device("auto", 2) == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    else:
        assert resolve_device("auto", 0) == "cuda:0"


def test_worker_cli_refuses_unknown_queues(capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    assert main(["worker", "--queues", "brain_mri,brain"]) == 2
    assert "unknown queue 'brain'" in capsys.readouterr().err


def test_model_rolled_back_reactivates_the_earlier_job(database: Database, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    card = model_dir / "model_card.json"
    settings = load_settings(overrides={"detectors": {"brain_mri": {"model_dir": str(model_dir)}}})
    dispatcher = RecordingDispatcher()
    made = make_study(database, tmp_path / "s1")
    card.write_text(json.dumps({"version": "1"}))
    (v1,) = rerun_study(database, settings, dispatcher, made.study_uid, model_version=model_card_versions(settings))
    card.write_text(json.dumps({"version": "2"}))
    (v2,) = rerun_study(database, settings, dispatcher, made.study_uid, model_version=model_card_versions(settings))
    card.write_text(json.dumps({"version": "1"}))
    assert scheduler_for(database, settings, dispatcher).on_study_complete(made.study_id) == [v1]
    states = {job.id: job.state for job in jobs_of(database)}
    assert states == {v1: JobState.QUEUED, v2: JobState.SUPERSEDED}
    assert events_of(database, v1) == ["created", "superseded", "reactivated"]


def test_sweeper_resends_lost_deliveries_once(database: Database, tmp_path: Path) -> None:
    from datetime import timedelta

    from dicom_node.db import DeliveryAttempt
    from dicom_node.jobs.sweeper import Sweeper
    from dicom_node.timeutil import utcnow

    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "backoff_max_seconds": 40}
    settings = load_settings(overrides={"workers": {"requeue_after_seconds": 60}, "destinations": [destination]})
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
    lost, busy = (scheduler.on_study_complete(make_study(database, tmp_path / name).study_id)[0] for name in "ab")
    for job_id in (lost, busy):
        lease = acquire_lease(database, job_id, "w@h#1", 60)
        assert lease is not None
        complete_job(database, lease, series_score=0.1, image_threshold=0.5, is_abnormal=False, result_path="r")
    sweeper = Sweeper(database, settings, dispatcher, model_version=model_card_versions(settings))
    assert sweeper.sweep_once().deliveries_resent == []  # just finished: its deliver message is on its way
    later = utcnow() + timedelta(seconds=101)
    with database.session() as session:  # the other job's delivery is retrying right now
        session.add(DeliveryAttempt(job_id=busy, destination="pacs", attempt=1, started_at=later, outcome="retry"))
    assert sweeper.sweep_once(later).deliveries_resent == [lost]
    assert sweeper.sweep_once(later + timedelta(seconds=1)).deliveries_resent == []  # once per period
    assert dispatcher.deliveries == [lost]
    assert events_of(database, lost)[-1] == "delivery_resend"


def test_heartbeats_decide_whether_a_holder_is_gone(database: Database, tmp_path: Path) -> None:
    """Liveness, not the lease: another node takes over a job whose holder's pool process or worker is gone."""
    from datetime import timedelta

    from dicom_node.heartbeat import Beat, publish
    from dicom_node.jobs.sweeper import Sweeper
    from dicom_node.timeutil import utcnow

    settings = load_settings(
        overrides={"workers": {"heartbeat_seconds": 1, "failover_grace_seconds": 10, "sweep_interval_seconds": 2}}
    )
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
    job_id = scheduler.on_study_complete(make_study(database, tmp_path / "a").study_id)[0]
    publish(database, Beat("w1@hostB", 100, ["brain_mri"], [101], [], utcnow()), started=True)
    assert acquire_lease(database, job_id, "w1@hostB#101", 600, settings) is not None
    # The pool process is alive in a beat taken after the job started: a returned message is a duplicate.
    publish(database, Beat("w1@hostB", 100, ["brain_mri"], [101], [], utcnow() + timedelta(seconds=1)))
    assert acquire_lease(database, job_id, "w2@hostC#7", 600, settings) is None
    # The next beat no longer lists it (kill -9 of the pool process): any worker takes over at once.
    publish(database, Beat("w1@hostB", 100, ["brain_mri"], [102], [], utcnow() + timedelta(seconds=2)))
    publish(database, Beat("w2@hostC", 5, ["brain_mri"], [7], [], utcnow() - timedelta(seconds=1)), started=True)
    lease = acquire_lease(database, job_id, "w2@hostC#7", 600, settings)
    assert lease is not None and lease.attempt == 2
    with database.session() as session:
        detail = session.scalars(select(JobEvent.detail).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    assert "pool process 101 of w1@hostB is gone" in (detail[-1] or "")

    # The whole worker stops beating: the sweeper re-queues its job within the grace, with the reason.
    sweeper = Sweeper(database, settings, dispatcher, model_version=model_card_versions(settings))
    dispatcher.detections.clear()
    assert not sweeper.sweep_once(utcnow() + timedelta(seconds=5)).worker_lost  # silent 5 s: within the limit
    report = sweeper.sweep_once(utcnow() + timedelta(seconds=9))  # silent beyond grace less one sweep (8 s)
    assert report.worker_lost == [job_id] and [j for j, _ in dispatcher.detections] == [job_id]
    with database.session() as session:
        event = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
        ).one()
    assert event.event == "worker_lost" and "w2@hostC stopped beating" in (event.detail or "")
    assert "time limit" not in (event.detail or "")


def test_sweeper_tells_lost_messages_from_queued_ones(database: Database, tmp_path: Path) -> None:
    from datetime import timedelta

    from dicom_node.jobs.sweeper import BrokerSnapshot, Sweeper
    from dicom_node.timeutil import utcnow

    settings = load_settings(
        overrides={"workers": {"heartbeat_seconds": 1, "requeue_after_seconds": 30, "sweep_interval_seconds": 2}}
    )
    dispatcher = RecordingDispatcher()
    scheduler = scheduler_for(database, settings, dispatcher)
    waiting = scheduler.on_study_complete(make_study(database, tmp_path / "a").study_id)[0]
    lost = scheduler.on_study_complete(make_study(database, tmp_path / "b").study_id)[0]

    class Broker:
        down = False
        forgotten: list[str] = []

        def snapshot(self) -> BrokerSnapshot | None:
            if self.down:
                return None
            return BrokerSnapshot({("dicom_node.detect", waiting)}, {"tag-1": ("dicom_node.detect", 99, 0.0)})

        def forget(self, tags: object) -> int:
            self.forgotten += list(tags)  # type: ignore[call-overload]
            return len(self.forgotten)

    broker = Broker()
    sweeper = Sweeper(database, settings, dispatcher, model_version=model_card_versions(settings), inspector=broker)
    dispatcher.detections.clear()
    start = utcnow() + timedelta(seconds=600)  # long after queueing: a time rule would re-send both
    broker.down = True
    assert not sweeper.sweep_once(start).resent  # the broker does not answer: nothing is decided
    broker.down = False
    assert not sweeper.sweep_once(start).resent  # first seen missing
    report = sweeper.sweep_once(start + timedelta(seconds=3.1))  # missing for two heartbeats and a second
    assert report.resent == [lost] and [job_id for job_id, _ in dispatcher.detections] == [lost]
    assert "tag-1" in broker.forgotten  # unacked, and no live worker holds it
    assert waiting not in sweeper.sweep_once(start + timedelta(seconds=700)).resent  # still in its queue
