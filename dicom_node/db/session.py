"""Engine and session factory; schema upgrades through Alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


# How long a statement waits for a lock another connection holds before it fails, unless the caller says otherwise.
DEFAULT_LOCK_TIMEOUT_SECONDS = 30.0


def _sqlite_pragmas(lock_timeout_ms: int, dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the SCP, the completion loop and the workers write concurrently; busy_timeout waits for locks
    # instead of failing; foreign keys are off by default in SQLite. synchronous=FULL: each commit is on disk (the
    # WAL fsynced) before it returns, so an instance answered with Success keeps its row through a power cut
    # (NORMAL would only survive a crash of the process); the receive path groups its commits to pay for it.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={lock_timeout_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS, *, pooled: bool = True) -> Engine:
    """An engine whose statements wait at most ``lock_timeout_seconds`` for a lock (SQLite busy_timeout,
    PostgreSQL lock_timeout) and then fail, so that a caller with a deadline can still answer.

    ``pooled=False``: no connection is kept between uses (a process that forks children, such as a Celery worker's
    main process, must not hand them open connections)."""
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": lock_timeout_seconds, "check_same_thread": False}, **pool)
        event.listen(engine, "connect", partial(_sqlite_pragmas, lock_timeout_ms))
        return engine
    connect_args: dict[str, Any] = (
        {"options": f"-c lock_timeout={lock_timeout_ms}"} if url.startswith("postgresql") else {}
    )
    if not pooled:
        if url.startswith("postgresql"):  # a database host that is away must not hold this process for long
            connect_args["connect_timeout"] = max(1, int(lock_timeout_seconds))
        return create_engine(url, connect_args=connect_args, **pool)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (creates it on first use)."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


class Database:
    """Owns one engine and hands out sessions; pass it to the layers that need the job database."""

    def __init__(
        self,
        url: str,
        *,
        upgrade: bool = True,
        lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
        pooled: bool = True,
    ) -> None:
        self.url = url
        if upgrade:
            migrate(url)
        self.engine = make_engine(url, lock_timeout_seconds, pooled=pooled)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
