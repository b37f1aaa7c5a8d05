"""Queue depth and expected wait (``GET /api/queue``, the admin page's Queue table) on SQLite and PostgreSQL.

The expected wait of a job queued now = (time left of the running jobs + queued x median run) / live pool
processes consuming the queue, the median over the detector's last 20 finished runs (docs/workers.md).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_node.admin import queries
from dicom_node.admin.api import create_app
from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, JobState, Series, Study, StudyState, WorkerHeartbeat

READ = "read-token-for-tests"
NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def _settings(tmp_path: Path, url: str) -> Settings:
    return load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path)},
            "database": {"url": url},
            "http": {"read_tokens": [READ]},
            "workers": {"heartbeat_seconds": 5, "failover_grace_seconds": 30, "sweep_interval_seconds": 5},
        }
    )


def _jobs(db: Database, detector: str, specs: list[tuple[JobState, float | None, float | None]]) -> None:
    """Jobs of ``detector``: (state, started seconds before NOW, run seconds); the first queued one backs off."""
    backing_off = next((i for i, spec in enumerate(specs) if spec[0] == JobState.QUEUED), None)
    with db.session() as session:
        study = Study(study_instance_uid=f"1.2.3.{detector}.{len(specs)}", state=StudyState.COMPLETE)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=f"{study.study_instance_uid}.1", detector=detector)
        session.add(series)
        session.flush()
        for index, (state, started_ago, run) in enumerate(specs):
            started = None if started_ago is None else NOW - timedelta(seconds=started_ago)
            session.add(
                Job(
                    study_id=study.id,
                    series_id=series.id,
                    detector=detector,
                    instance_set_hash="0" * 64,
                    model_version="1",
                    result_key=f"{detector}-{index}-{len(specs)}",
                    state=state,
                    queued_at=NOW - timedelta(hours=1),
                    started_at=started,
                    finished_at=None if started is None or run is None else started + timedelta(seconds=run),
                    next_attempt_at=NOW + timedelta(seconds=30) if index == backing_off else None,
                )
            )


def _beat(db: Database, name: str, queues: str, processes: list[int], ago: float, now: datetime = NOW) -> None:
    with db.session() as session:
        session.add(
            WorkerHeartbeat(
                name=name,
                pid=1,
                queues=queues,
                processes=json.dumps(processes),
                held="[]",
                started_at=now - timedelta(hours=1),
                beat_at=now - timedelta(seconds=ago),
            )
        )


@pytest.fixture
def settings(tmp_path: Path, database: Database) -> Settings:
    return _settings(tmp_path, database.url)


def test_expected_wait_from_recent_runs_and_live_workers(database: Database, settings: Settings) -> None:
    # brain_mri: 21 finished runs, the oldest 100 s (left out: only the last 20 count), the others 10 s and 30 s;
    # two running (one started 4 s ago, one 40 s ago: past the median, nothing left); five queued.
    finished = [(JobState.DELIVERED, 5000.0, 100.0)]
    finished += [(JobState.SUCCEEDED, 1000.0 - i, 10.0 if i % 2 else 30.0) for i in range(20)]
    running = [(JobState.RUNNING, 4.0, None), (JobState.RUNNING, 40.0, None)]
    _jobs(database, "brain_mri", finished + running + [(JobState.QUEUED, None, None)] * 5)
    # chest_xray: queued, but its only worker stopped beating a minute ago.
    _jobs(database, "chest_xray", [(JobState.SUCCEEDED, 100.0, 2.0), (JobState.QUEUED, None, None)])
    _beat(database, "gpu1@a", "delivery,brain_mri", [11, 12], ago=2)
    _beat(database, "cpu@b", "brain_mri,chest_xray", [21], ago=4)
    _beat(database, "dead@c", "chest_xray", [31, 32], ago=60)
    with database.session() as session:
        report = queries.queue_status(session, settings, NOW)
    brain, chest = report.detectors
    assert brain.detector == "brain_mri"
    assert (brain.queued, brain.waiting_retry, brain.running) == (5, 1, 2)
    assert brain.workers == ["cpu@b", "gpu1@a"] and brain.worker_processes == 3
    assert brain.recent_runs == 20 and brain.run_p50 == pytest.approx(20.0)
    # (16 s left of the job started 4 s ago + 0 of the other + 5 x 20 s) / 3 processes
    assert brain.expected_wait == pytest.approx((16.0 + 5 * 20.0) / 3)
    assert brain.note is None
    assert chest.detector == "chest_xray"
    assert (chest.queued, chest.running, chest.worker_processes) == (1, 0, 1)
    assert chest.workers == ["cpu@b"]
    assert chest.expected_wait == pytest.approx(2.0)


def test_no_estimate_without_live_worker_or_history(database: Database, settings: Settings) -> None:
    _jobs(database, "brain_mri", [(JobState.QUEUED, None, None)] * 3)
    with database.session() as session:
        report = queries.queue_status(session, settings, NOW)
    brain = next(d for d in report.detectors if d.detector == "brain_mri")
    assert brain.queued == 3 and brain.expected_wait is None
    assert brain.note == "no live worker consumes this queue"
    _beat(database, "w@a", "brain_mri", [], ago=1)  # a pool not read at that beat still counts as one process
    with database.session() as session:
        report = queries.queue_status(session, settings, NOW)
    brain = next(d for d in report.detectors if d.detector == "brain_mri")
    assert brain.worker_processes == 1 and brain.expected_wait is None
    assert brain.note == "no finished run to estimate from yet"


def test_queue_endpoint(database: Database, settings: Settings) -> None:
    _jobs(database, "brain_mri", [(JobState.SUCCEEDED, 100.0, 8.0), (JobState.QUEUED, None, None)])
    _beat(database, "w@a", "brain_mri", [5, 6], ago=0, now=datetime.now(UTC))
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/api/queue").status_code == 401
        body = client.get("/api/queue", headers={"Authorization": f"Bearer {READ}"}).json()
    brain = next(d for d in body["detectors"] if d["detector"] == "brain_mri")
    assert brain["queued"] == 1 and brain["worker_processes"] == 2
    assert brain["expected_wait"] == pytest.approx(4.0)
    assert {d["detector"] for d in body["detectors"]} >= {"brain_mri", "chest_xray"}
