"""The admin HTTP service as ``dicom-node serve`` runs it: generated token, start/stop, port in use, disabled."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import httpx
import pytest
from conftest import free_port, port_open

from dicom_node.admin.service import TOKEN_FILE, HttpService, admin_service, ensure_token
from dicom_node.config import load_settings
from dicom_node.db import Database


def _settings(tmp_path: Path, sqlite_url: str, **http: object):  # type: ignore[no-untyped-def]
    return load_settings(overrides={"node": {"data_dir": str(tmp_path)}, "database": {"url": sqlite_url}, "http": http})


def test_generated_admin_token_is_private_and_stable(tmp_path: Path, sqlite_url: str) -> None:
    settings = _settings(tmp_path, sqlite_url)
    first = ensure_token(settings)
    [token] = first.http.admin_tokens
    path = tmp_path / TOKEN_FILE
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(settings).http.admin_tokens == [token]  # reused after a restart
    assert settings.http.admin_tokens == []  # the caller's settings are not changed
    configured = _settings(tmp_path, sqlite_url, read_tokens=["r"])
    assert ensure_token(configured) is configured


def test_service_serves_and_stops(tmp_path: Path, sqlite_url: str) -> None:
    db = Database(sqlite_url)
    port = free_port()
    service = HttpService(_settings(tmp_path, sqlite_url, port=port, read_tokens=["reader"]), db)
    service.start()
    try:
        assert service.url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{service.url}/healthz").json()["status"] == "ok"
        page = httpx.get(f"{service.url}/")
        assert page.status_code == 200 and "dicom-node" in page.text
        script = httpx.get(f"{service.url}/static/app.js")
        assert script.status_code == 200 and "showTimeline" in script.text
        assert httpx.get(f"{service.url}/api/jobs", headers={"Authorization": "Bearer reader"}).status_code == 200
    finally:
        service.stop()
        db.dispose()
    assert not port_open(port)


def test_port_in_use_is_a_clear_error(tmp_path: Path, sqlite_url: str) -> None:
    db = Database(sqlite_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = HttpService(_settings(tmp_path, sqlite_url, port=port, read_tokens=["r"]), db)
        with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}: Address already in use"):
            service.start()
    db.dispose()


def test_port_zero_disables(tmp_path: Path, sqlite_url: str) -> None:
    db = Database(sqlite_url)
    assert admin_service(_settings(tmp_path, sqlite_url, port=0), db) is None
    with pytest.raises(ValueError, match="disabled"):
        HttpService(_settings(tmp_path, sqlite_url, port=0), db)
    db.dispose()


def test_page_assets_fetch_nothing_from_outside() -> None:
    static = Path(__file__).resolve().parents[1] / "dicom_node" / "admin" / "static"
    for path in static.iterdir():
        text = path.read_text()
        for marker in ("https://", "http://", "//cdn", "@import"):
            if marker == "http://" and path.suffix == ".js":
                # The only URL in the script is the SVG namespace identifier, which is never fetched.
                assert text.count("http://") == 1 and 'SVG_NS = "http://www.w3.org/2000/svg"' in text
                continue
            assert marker not in text, f"{path.name} refers to {marker}"


def test_admin_surface_never_imports_torch(tmp_path: Path) -> None:
    """The API, metrics, actions and CLI modules load without torch (GPU metrics only read an already-loaded one)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dicom_node.config import load_settings\n"
        "from dicom_node.db import Database\n"
        "from dicom_node.admin.api import create_app\n"
        "from dicom_node.admin.metrics import make_registry\n"
        "from dicom_node.admin.actions import JobActions\n"
        "from dicom_node.workers.app import CeleryDispatcher, create_app as celery_app\n"
        "import dicom_node.cli.stats, dicom_node.cli.job_show\n"
        "from prometheus_client import generate_latest\n"
        f"s = load_settings(overrides={{'node': {{'data_dir': {str(tmp_path)!r}}}}})\n"
        "db = Database(s.database_url)\n"
        "create_app(s, db, JobActions(db, s, CeleryDispatcher(celery_app(s), s), model_version=lambda d: 'v'))\n"
        "generate_latest(make_registry(db))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
