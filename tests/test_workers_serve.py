"""``dicom-node serve`` runs the whole pipeline on one box: DCMTK storescu → SCP → completion → job → embedded
worker on the embedded broker → result, with no server besides the node."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from receive_support import NodeProcess, storescu
from sqlalchemy import select
from worker_harness import install_plugin, wait_for
from workers_support import MR_DIR

from dicom_node.db import Database, Job, JobState
from dicom_node.models.base import SeriesResult

pytestmark = [pytest.mark.slow]


def test_serve_runs_embedded_workers_end_to_end(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_card.json").write_text(json.dumps({"version": "test-1"}))
    monkeypatch.setenv("PYTHONPATH", install_plugin(tmp_path / "plugin"))
    node = NodeProcess(
        tmp_path / "data",
        sqlite_url,
        settings={
            "workers": {"embedded": True, "sweep_interval_seconds": 1.0, "device": "cpu"},
            "detectors": {"brain_mri": {"model_dir": str(model_dir)}, "chest_xray": {"model_dir": str(model_dir)}},
        },
    )
    node.start()
    db = Database(sqlite_url)
    try:
        files = sorted(MR_DIR.glob("*.dcm"))[:4]
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr

        def finished() -> Job | None:
            with db.session() as session:
                job = session.scalar(select(Job))
                if job is not None:
                    session.expunge(job)
                return job if job is not None and job.state in (JobState.SUCCEEDED, JobState.FAILED) else None

        try:
            job = wait_for(finished, 120, "the job of the received series")
        except AssertionError:
            print(node.log()[-8000:])
            raise
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.detector == "brain_mri" and job.worker and job.worker.startswith("embedded@")
        result = SeriesResult.load(Path(job.result_path or ""))
        assert len(result.sop_instance_uids) == 4
        started = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - started < 30
    finally:
        node.stop()
        db.dispose()
