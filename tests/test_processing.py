"""run_detection in-process: result saved and recorded, slices batched, delivery sent, transient errors retried."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from workers_support import RecordingDispatcher, make_study

from dicom_node.config import load_settings
from dicom_node.db import Database, Instance, Job, JobState
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.models.base import ModelIdentity, SeriesResult
from dicom_node.workers.detection import run_detection
from dicom_node.workers.versions import model_card_versions

sys.path.insert(0, str(REPO / "tests" / "plugins"))
from dn_test_detectors import IntensityTestDetector  # noqa: E402


def test_run_detection_saves_records_and_sends_delivery(database: Database, tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"node": {"data_dir": str(tmp_path / "data")}, "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}
        ]}
    )  # fmt: skip
    detector = IntensityTestDetector("brain_mri", tmp_path / "model", "cpu")
    detector.batch_size = 2
    (tmp_path / "model").mkdir()
    dispatcher = RecordingDispatcher()
    made = make_study(database, tmp_path / "s1", slices=3)
    (job_id,) = JobScheduler(
        database, settings, dispatcher, model_version=model_card_versions(settings)
    ).on_study_complete(made.study_id)
    outcome = run_detection(
        database, settings, job_id, worker="w@h#1", detectors=lambda name: detector, dispatcher=dispatcher
    )
    assert outcome.state == "succeeded"
    assert detector.batches == [2, 1]
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED and job.attempts == 1
        assert job.result_path == str(settings.results_dir / f"job-{job_id}")
        result = SeriesResult.load(Path(job.result_path))
        assert sorted(result.sop_instance_uids) == sorted(made.sop_uids)
        assert job.series_score == pytest.approx(result.series_score) and job.is_abnormal == result.is_abnormal
    assert dispatcher.deliveries == [job_id]
    assert not list((settings.results_dir / ".staging").iterdir())
    # A duplicate message for the finished job does nothing.
    again = run_detection(database, settings, job_id, worker="w@h#2", detectors=lambda name: detector,
                          dispatcher=dispatcher)  # fmt: skip
    assert again.state == "skipped" and detector.batches == [2, 1]


def test_missing_instance_file_is_retried_with_backoff(database: Database, tmp_path: Path) -> None:
    settings = load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})
    detector = IntensityTestDetector("brain_mri", tmp_path / "model", "cpu")
    (tmp_path / "model").mkdir()
    dispatcher = RecordingDispatcher()
    made = make_study(database, tmp_path / "s1", slices=2)
    with database.session() as session:
        first = session.query(Instance).filter(Instance.series_id == made.series_id).first()
        assert first is not None
        Path(first.file_path).unlink()  # e.g. the shared spool briefly unmounted
    (job_id,) = JobScheduler(
        database, settings, dispatcher, model_version=model_card_versions(settings)
    ).on_study_complete(made.study_id)
    outcome = run_detection(
        database, settings, job_id, worker="w@h#1", detectors=lambda name: detector, dispatcher=dispatcher
    )
    assert outcome.state == "retry" and "FileNotFoundError" in outcome.detail
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.next_attempt_at is not None
    assert dispatcher.detections[-1] == (job_id, settings.workers.retry_backoff_seconds)


def test_worker_context_loads_plugin_detectors_once_with_batch_size(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker_harness import install_plugin

    from dicom_node.models import registry
    from dicom_node.workers.app import create_app
    from dicom_node.workers.context import get_context

    for entry in reversed(install_plugin(tmp_path / "plugin").split(":")):
        monkeypatch.syspath_prepend(entry)
    registry.clear_cache()  # the detectors are read once per process: read them again with the plugin installed
    (tmp_path / "model").mkdir()
    settings = load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path / "data")},
            "database": {"url": sqlite_url},
            "detectors": {"brain_mri": {"model_dir": str(tmp_path / "model"), "batch_size": 1}},
            "workers": {"device": "cpu"},
        }
    )
    Database(sqlite_url).dispose()  # migrated, as the worker's main process does before forking
    app = create_app(settings)
    context = get_context(app)
    try:
        assert get_context(app) is context and context.settings is settings and context.device == "cpu"
        detector = context.detector("brain_mri")
        assert isinstance(detector, IntensityTestDetector) and detector.batch_size == 1  # its own default is 4
        assert context.detector("brain_mri") is detector  # loaded once, kept warm
    finally:
        context.close()
        app.close()
        registry.clear_cache()  # the next reader sees the installed detectors only


def test_unreadable_spool_fails_the_job_at_once_with_the_reason(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose user may not read the shared spool: a clear failure, no retries, no hang."""
    import pydicom

    settings = load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})
    detector = IntensityTestDetector("brain_mri", tmp_path / "model", "cpu")
    dispatcher = RecordingDispatcher()
    made = make_study(database, tmp_path / "s1", slices=2)
    (job_id,) = JobScheduler(
        database, settings, dispatcher, model_version=model_card_versions(settings)
    ).on_study_complete(made.study_id)

    def denied(path: str, *args: object, **kwargs: object) -> pydicom.Dataset:
        raise PermissionError(13, "Permission denied", path)  # as for a worker running under another uid

    monkeypatch.setattr(pydicom, "dcmread", denied)
    outcome = run_detection(
        database, settings, job_id, worker="w@h#1", detectors=lambda name: detector, dispatcher=dispatcher
    )
    assert outcome.state == "failed"
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED and job.attempts == 1
        assert (job.error or "").startswith("SpoolUnreadable: ") and "permission denied for this worker (uid" in (
            job.error or ""
        )


def test_series_result_maps_keep_every_bit_and_older_results_still_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    maps = np.where(rng.random((3, 17, 23)) < 0.4, rng.normal(size=(3, 17, 23)), 0).astype(np.float32)
    maps[0, 0, :3] = [-0.0, np.nan, np.inf]
    result = SeriesResult(
        model=ModelIdentity("brain_mri", "test", "1", "ab" * 32),
        series_score=0.7,
        image_threshold=0.5,
        pixel_threshold=0.2,
        sop_instance_uids=["1.2.3", "1.2.4", "1.2.5"],
        image_scores=np.array([0.1, 0.7, 0.2]),
        anomaly_maps=maps,
        scored=np.array([True, True, False]),
    )
    loaded = SeriesResult.load(result.save(tmp_path / "new"))
    assert loaded.anomaly_maps.dtype == np.float32 and loaded.anomaly_maps.tobytes() == maps.tobytes()
    assert loaded.image_scores.tolist() == [0.1, 0.7, 0.2] and loaded.scored.tolist() == [True, True, False]
    assert loaded.series_score == 0.7 and loaded.sop_instance_uids == result.sop_instance_uids

    # A result written before the maps were stored sparse: one compressed ``anomaly_maps`` array.
    old = tmp_path / "old"
    old.mkdir()
    (tmp_path / "new" / "series_result.json").rename(old / "series_result.json")
    np.savez_compressed(old / "series_result.npz", image_scores=result.image_scores, anomaly_maps=maps,
                        scored=result.scored)  # fmt: skip
    assert SeriesResult.load(old).anomaly_maps.tobytes() == maps.tobytes()


class _TimeUp(Exception):
    """Stands for the task queue's soft time limit (Celery's SoftTimeLimitExceeded), which processing never imports."""


@pytest.mark.parametrize("named", [True, False])
def test_time_limit_exceptions_are_named_by_the_caller(database: Database, tmp_path: Path, named: bool) -> None:
    """An exception the caller names in ``time_limits`` fails the job with the soft limit as the reason; unnamed,
    the same exception is an ordinary permanent failure."""
    settings = load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})
    detector = IntensityTestDetector("brain_mri", tmp_path / "model", "cpu")

    def score_series(datasets: object) -> SeriesResult:
        raise _TimeUp("soft time limit exceeded")

    detector.score_series = score_series  # type: ignore[method-assign,assignment]
    dispatcher = RecordingDispatcher()
    made = make_study(database, tmp_path / "s1", slices=2)
    (job_id,) = JobScheduler(
        database, settings, dispatcher, model_version=model_card_versions(settings)
    ).on_study_complete(made.study_id)
    outcome = run_detection(
        database, settings, job_id, worker="w@h#1", detectors=lambda name: detector, dispatcher=dispatcher,
        time_limits=(_TimeUp,) if named else (),
    )  # fmt: skip
    assert outcome.state == "failed"
    limit = settings.detector("brain_mri").soft_time_limit_seconds
    expected = f"time limit: the detector ran longer than the soft limit of {limit:g} s"
    assert outcome.detail == (expected if named else "_TimeUp: soft time limit exceeded")
