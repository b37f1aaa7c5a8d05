from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Destination, load_settings


def test_defaults_need_no_file() -> None:
    settings = load_settings()
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.database_url.startswith("sqlite:///")


def test_yaml_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  ae_title: FROMFILE\n  port: 4242\n")
    monkeypatch.setenv("DICOM_NODE_NODE__PORT", "5555")
    settings = load_settings(path)
    assert settings.node.ae_title == "FROMFILE"
    assert settings.node.port == 5555


def test_invalid_key_is_one_line_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  port: 99999\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert "node.port" in message and "\n" not in message


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "dicom-node.example.yaml"
    load_settings(example)


def test_destination_parse() -> None:
    dest = Destination.parse("PACS@127.0.0.1:4242")
    assert (dest.ae_title, dest.host, dest.port) == ("PACS", "127.0.0.1", 4242)
    with pytest.raises(ValueError):
        Destination.parse("nonsense")


def test_database_schema_migrates(database) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import inspect

    names = set(inspect(database.engine).get_table_names())
    assert {"studies", "series", "instances", "jobs", "audit_events"} <= names


def test_unknown_detector_is_a_clear_error(tmp_path: Path) -> None:
    """Detector names are checked against the installed detectors (models/registry.py), in routing rules and in
    ``detectors``; the error lists the known ones."""
    config = tmp_path / "node.yaml"
    config.write_text("selection:\n  rules:\n    - {name: knee, detector: knee_xray, modality: [CR]}\n")
    with pytest.raises(ConfigError, match=r"unknown detector 'knee_xray'; known: brain_mri, chest_xray") as err:
        load_settings(config)
    assert "selection.rules.0.detector" in str(err.value)
    config.write_text("detectors:\n  knee_xray: {batch_size: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown detector 'knee_xray'; known: brain_mri, chest_xray") as err:
        load_settings(config)
    assert "detectors.knee_xray" in str(err.value)
