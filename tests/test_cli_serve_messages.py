"""What an admin sees from ``dicom-node``: one line per problem at start, a help text for users, a quiet log."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port

from dicom_node.cli import build_parser, main

DICOM_NODE = REPO / ".venv" / "bin" / "dicom-node"


def test_help_opens_with_a_description_for_users() -> None:
    text = build_parser().format_help()
    description = text.split("\n\n")[1]
    assert description.startswith("A DICOM worker node: receives studies over C-STORE")
    assert "module" not in text and "register(" not in text  # no developer docstring
    assert "--data-dir DIR and --json" in " ".join(text.split())


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        ("ORTHANC@127.0.0.1:70000", "port: Input should be less than or equal to 65535"),
        ("ORTHANC@127.0.0.1:0", "port: Input should be greater than or equal to 1"),
        ("ORTH\\ANC@127.0.0.1:4242", "'ORTH\\\\ANC' is not a valid AE title (1-16 printable characters, no backslash)"),
    ],
)
def test_invalid_destination_is_one_line(
    destination: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path), "--destination", destination]) == 2
    err = capsys.readouterr().err
    assert err == f"dicom-node: invalid configuration: --destination: {problem}\n"


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return subprocess.run(
        [str(DICOM_NODE), "serve", "--data-dir", str(tmp_path / "data"), "--no-workers", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_dicom_port_in_use_is_named(tmp_path: Path, busy_port: int) -> None:
    result = _serve(tmp_path, "--bind-address", "127.0.0.1", "--port", str(busy_port), "--http-port", "0")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"dicom-node: cannot start: DICOM service could not listen on 127.0.0.1:{busy_port}: Address already in use"
    )
    assert "Traceback" not in result.stderr


def test_http_port_in_use_is_named(tmp_path: Path, busy_port: int) -> None:
    result = _serve(tmp_path, "--bind-address", "127.0.0.1", "--port", str(free_port()), "--http-port", str(busy_port))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"dicom-node: cannot start: admin HTTP service could not listen on 127.0.0.1:{busy_port}: "
        "Address already in use"
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("highdicom", "pynetdicom")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


def test_serve_logging_keeps_highdicom_at_warning(restore_logging: None) -> None:
    from dicom_node.logconfig import configure_logging

    logging.getLogger("highdicom").setLevel(logging.NOTSET)
    configure_logging("INFO")
    assert logging.getLogger("dicom_node.serve").isEnabledFor(logging.INFO)
    for name in ("highdicom.seg.sop", "highdicom.sr", "pynetdicom.acse"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name


def test_worker_start_has_no_superuser_warning(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery warns at worker start when it runs as root (containers do); the node's workers accept JSON only, so the
    worker process silences that one warning (and keeps highdicom's per-object INFO lines out of its log)."""
    from celery.exceptions import SecurityWarning
    from celery.platforms import check_privileges

    from dicom_node.logconfig import prepare_worker_logging

    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        check_privileges(["json"])
    assert [w.category for w in before] == [SecurityWarning]  # what the worker would log without the filter

    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        logging.getLogger("highdicom").setLevel(logging.NOTSET)
        prepare_worker_logging()
        check_privileges(["json"])
        warnings.warn("another warning", SecurityWarning, stacklevel=1)
    assert [str(w.message) for w in after] == ["another warning"]
    assert not logging.getLogger("highdicom.seg").isEnabledFor(logging.INFO)


def test_worker_command_prepares_its_logging(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``dicom-node worker`` (which ``serve`` runs for its embedded workers) calls prepare_worker_logging before
    Celery starts."""
    import dicom_node.workers.worker

    calls: list[str] = []
    monkeypatch.setattr("dicom_node.logconfig.prepare_worker_logging", lambda: calls.append("prepared"))
    monkeypatch.setattr(dicom_node.workers.worker, "run_worker", lambda settings, **kwargs: calls.append("run") or 0)
    assert main(["worker", "--data-dir", str(tmp_path), "--queues", "chest_xray"]) == 0
    assert calls == ["prepared", "run"]
