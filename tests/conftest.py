"""Shared fixtures: paths to the real data, job databases on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from dicom_node.db import Database

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
DICOM_DATA = DATA / "dicom"
POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.sqlite'}"


def fresh_postgres_database(prefix: str = "dn_test") -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, drop it afterwards (for fixtures of any scope)."""
    if not port_open(5432):
        pytest.skip("PostgreSQL is not listening on 127.0.0.1:5432")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    yield from fresh_postgres_database()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite and against the real PostgreSQL server."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A private ``redis-server`` on a free loopback port (``worker_harness.RedisServer``), stopped after the test.
    Imported lazily: the harness loads Celery, which most tests do not need."""
    import shutil

    from worker_harness import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; make test-deps installs it)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
