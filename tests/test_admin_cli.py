"""CLI parity with the admin API: ``dicom-node jobs show`` and ``dicom-node stats`` on a real job database."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from admin_rows import DETECTION_ERROR, Rows, fill
from conftest import REPO

from dicom_node.cli import main
from dicom_node.db import Database


@pytest.fixture
def config(tmp_path: Path, database: Database) -> tuple[Path, Rows]:
    rows = fill(database)
    path = tmp_path / "dicom-node.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path)}, "database": {"url": database.url}}))
    return path, rows


def test_jobs_show(config: tuple[Path, Rows], capsys: pytest.CaptureFixture[str]) -> None:
    path, rows = config
    job_id = rows.jobs["brain_normal"]
    assert main(["jobs", "show", str(job_id), "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"job {job_id}: brain_mri 1.0.0  state delivered" in text
    assert rows.studies["brain_normal"] in text
    for step in ("received", "complete", "queued", "started", "finished", "delivery", "delivered"):
        assert f"\n{step} " in text, step
    assert "retry status 0xA700" in text and "run 14.00 s" in text

    assert main(["jobs", "show", str(rows.jobs["brain_failed"]), "--config", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["job"]["error"] == DETECTION_ERROR
    assert [s["name"] for s in document["steps"]] == [
        "received",
        "last_received",
        "complete",
        "queued",
        "started",
        "finished",
    ]

    assert main(["jobs", "show", "999999", "--config", str(path)]) == 1
    assert "job 999999 not found" in capsys.readouterr().err


def test_stats(config: tuple[Path, Rows], capsys: pytest.CaptureFixture[str]) -> None:
    path, _rows = config
    assert main(["stats", "--since", "24h", "--config", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    per = {d["detector"]: d for d in document["detectors"]}
    assert per["chest_xray"]["abnormal_rate"] == pytest.approx(0.5)
    assert per["brain_mri"]["latency_p50"] is not None and per["brain_mri"]["latency_p95"] is not None

    assert main(["stats", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "6 studies, 34 instances received, 5 jobs" in text
    chest = next(line for line in text.splitlines() if line.startswith("chest_xray"))
    assert "1/2" in chest and "50.0 %" in chest

    assert main(["stats", "--since", "1m", "--config", str(path)]) == 0
    assert "no jobs in this period" in capsys.readouterr().out


def test_console_script_stats_rejects_bad_duration(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / ".venv/bin/dicom-node"), "stats", "--since", "yesterday"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "neither a duration" in result.stderr
