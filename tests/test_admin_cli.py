"""CLI parity with the admin API: ``dicom-node jobs show`` and ``dicom-node stats`` on a real job database."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from admin_rows import DETECTION_ERROR, Rows, fill
from conftest import REPO

from dicom_node.cli import main
from dicom_node.db import Database, Job, JobState


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


@pytest.fixture
def data_dir_rows(tmp_path: Path) -> tuple[Path, Rows]:
    """A node data directory holding its default SQLite job database (no configuration file), filled."""
    data = tmp_path / "node-data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'jobs.sqlite'}")
    try:
        return data, fill(db)
    finally:
        db.dispose()


def _broker_payloads(data: Path) -> list[str]:
    from sqlalchemy import create_engine, text

    broker = create_engine(f"sqlite:///{data / 'broker' / 'broker.sqlite'}")
    try:
        with broker.connect() as connection:
            return list(connection.execute(text("SELECT payload FROM kombu_message")).scalars().all())
    finally:
        broker.dispose()


def test_admin_commands_take_data_dir_and_json(
    data_dir_rows: tuple[Path, Rows], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every admin command that reads the job database finds it with --data-dir (like serve) and answers --json."""
    data, rows = data_dir_rows
    monkeypatch.chdir(data.parent)  # not the default ./data: only --data-dir can find the database
    common = ["--data-dir", str(data), "--json"]
    assert main(["jobs", "list", *common]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    assert main(["jobs", "show", str(rows.jobs["brain_normal"]), *common]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["state"] == "delivered"
    assert main(["studies", "show", rows.studies["brain_normal"], *common]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == 24
    assert main(["stats", *common]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 5
    assert main(["jobs", "retry", str(rows.jobs["brain_failed"]), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["action"] == "retry" and result["job_ids"] == [rows.jobs["brain_failed"]]
    assert "queued again (attempt 2)" in result["detail"]


def test_jobs_list_failed_means_every_failure(
    data_dir_rows: tuple[Path, Rows], capsys: pytest.CaptureFixture[str]
) -> None:
    data, rows = data_dir_rows
    assert main(["jobs", "list", "--status", "failed", "--data-dir", str(data), "--json"]) == 0
    listed = {r["id"]: r["state"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {rows.jobs["brain_failed"]: "failed", rows.jobs["chest_delivery_failed"]: "delivery_failed"}
    assert main(["jobs", "list", "--status", "delivery_failed", "--data-dir", str(data), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [rows.jobs["chest_delivery_failed"]]
    with pytest.raises(SystemExit):
        main(["jobs", "list", "--help"])
    assert "failed: every failure" in " ".join(capsys.readouterr().out.split())


def test_jobs_retry_delivers_a_delivery_failure_again(
    data_dir_rows: tuple[Path, Rows], capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI does what POST /api/jobs/ID/retry does (JobActions): a delivery_failed job is delivered again."""
    data, rows = data_dir_rows
    refused = rows.jobs["chest_delivery_failed"]
    assert main(["jobs", "retry", str(refused), "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == f"job {refused}: delivery queued again (it was delivery_failed)"
    db = Database(f"sqlite:///{data / 'jobs.sqlite'}")
    try:
        with db.session() as session:
            job = session.get(Job, refused)
            assert job is not None and job.state == JobState.SUCCEEDED
    finally:
        db.dispose()
    payloads = _broker_payloads(data)
    assert len(payloads) == 1 and "dicom_node.deliver" in payloads[0]

    delivered = rows.jobs["brain_normal"]
    assert main(["jobs", "retry", str(delivered), "--data-dir", str(data)]) == 1
    assert "only failed or queued jobs can be retried" in capsys.readouterr().err
    assert main(["jobs", "retry", "424242", "--data-dir", str(data), "--json"]) == 1
    assert capsys.readouterr().err.strip() == "dicom-node: job 424242 not found"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs", "show", str(2**63)], "out of range"),
        (["jobs", "retry", "0"], "out of range"),
        (["jobs", "list", "--limit", str(2**70)], "out of range"),
        (["jobs", "list", "--since", "99999999999d"], "too long a duration"),
        (["stats", "--since", "99999999999d"], "too long a duration"),
    ],
)
def test_out_of_range_arguments_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["jobs", "list"], ["jobs", "show", "1"], ["studies", "show", "1.2.3"], ["stats"]])
def test_admin_commands_refuse_to_invent_a_database(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --config, no --data-dir, no DICOM_NODE_ variable, and no ./data/jobs.sqlite: one line, exit 2, and no
    empty database left behind (not a silent "no jobs")."""
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.upper().startswith("DICOM_NODE_")]:
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no job database at" in err and "--config" in err and "--data-dir" in err
    assert not (tmp_path / "data").exists()
