"""``dicom-node jobs list`` and ``dicom-node studies show`` on a job database filled directly."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.db import Database, Job, JobState, Series, Study, StudyState
from dicom_node.timeutil import parse_duration, utcnow


@pytest.fixture
def config(tmp_path: Path, sqlite_url: str) -> Path:
    db = Database(sqlite_url)
    now = utcnow()
    with db.session() as session:
        study = Study(
            study_instance_uid="1.2.3",
            state=StudyState.COMPLETE,
            completion_reason="quiet for 30 s",
            instance_count=2,
            completion_count=1,
            modalities="MR",
            calling_ae_title="MRI",
        )
        session.add(study)
        session.flush()
        series = Series(
            study_id=study.id,
            series_instance_uid="1.2.3.1",
            modality="MR",
            instance_count=2,
            series_description="t1",
            detector="brain_mri",
            routing_rule="brain-mr",
            routing_reason="rule brain-mr matched",
        )
        ignored = Series(
            study_id=study.id,
            series_instance_uid="1.2.3.2",
            modality="MR",
            instance_count=1,
            routing_reason="localizer",
            routing_rule="localizer",
        )
        session.add_all([series, ignored])
        session.flush()
        for i, (state, age) in enumerate([(JobState.QUEUED, 10), (JobState.FAILED, 60 * 60 * 5)]):
            session.add(
                Job(
                    study_id=study.id,
                    series_id=series.id,
                    detector="brain_mri",
                    instance_set_hash="x",
                    result_key=f"k{i}",
                    state=state,
                    created_at=now - timedelta(seconds=age),
                )
            )
    db.dispose()
    path = tmp_path / "config.yaml"
    path.write_text(f"database: {{url: '{sqlite_url}'}}\nnode: {{data_dir: '{tmp_path}'}}\n")
    return path


def test_jobs_list_filters_and_formats(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "list", "--config", str(config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["queued", "failed"]
    assert main(["jobs", "list", "--config", str(config), "--json", "--since", "2h"]) == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["queued"]
    assert main(["jobs", "list", "--config", str(config), "--status", "failed"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["ID", "STATE", "DETECTOR"]
    assert "failed" in out and "queued" not in out
    with pytest.raises(SystemExit) as err:
        main(["jobs", "list", "--config", str(config), "--since", "yesterday"])
    assert err.value.code == 2


def test_studies_show(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", "show", "1.2.3", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completion_reason"] == "quiet for 30 s"
    assert [(s["detector"], s["routing_reason"]) for s in report["series"]] == [
        ("brain_mri", "rule brain-mr matched"),
        (None, "localizer"),
    ]
    assert len(report["jobs"]) == 2
    assert main(["studies", "show", "1.2.3", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "completion reason:   quiet for 30 s" in text and "ignored" in text and "Jobs" in text
    assert main(["studies", "show", "9.9.9", "--config", str(config)]) == 1


def test_parse_duration() -> None:
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1d") == timedelta(days=1)
    with pytest.raises(ValueError):
        parse_duration("2 fortnights")


def test_serve_flags_become_settings(tmp_path: Path) -> None:
    from dicom_node.cli import build_parser
    from dicom_node.cli.serve import overrides_from

    args = build_parser().parse_args(
        [
            "serve",
            "--ae-title",
            "NODE2",
            "--port",
            "11113",
            "--data-dir",
            str(tmp_path),
            "--study-quiet-seconds",
            "5",
            "--no-workers",
            "--http-port",
            "0",
            "--destination",
            "PACS@127.0.0.1:4242",
        ]
    )
    assert overrides_from(args) == {
        "node": {"ae_title": "NODE2", "port": 11113, "data_dir": str(tmp_path)},
        "completion": {"quiet_seconds": 5.0},
        "http": {"port": 0},
        "workers": {"embedded": False},
    }
    assert args.destination == ["PACS@127.0.0.1:4242"]


def test_serve_rejects_a_bad_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--data-dir", str(tmp_path), "--destination", "not-a-destination"]) == 2
    assert "--destination" in capsys.readouterr().err
