"""The embedded broker: Kombu's SQLAlchemy transport on a SQLite file under the data directory.

Chosen so that ``make serve`` runs the whole pipeline on one box with no server: publishing is one INSERT and
consuming is ``BEGIN IMMEDIATE`` + SELECT + UPDATE, so several worker processes on the same box never take the same
message and a half-written message is never read. It lives in its own SQLite file so that broker polling does not
contend with the job database the SCP writes. Redis replaces it in production (docs/workers.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.transport.sqlalchemy import Channel as SqlaChannel
from kombu.transport.sqlalchemy import Transport as SqlaTransport
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

EMBEDDED_SCHEME = "sqlite"
POLLING_INTERVAL_SECONDS = 0.1
_LOCAL_OPTIONS = ("polling_interval",)


class EmbeddedChannel(SqlaChannel):
    def _engine_from_config(self) -> Any:
        # Kombu hands every transport option to create_engine; keep the ones that are ours.
        url = str(self.connection.client.hostname)
        if url.startswith(EMBEDDED_SCHEME + ":///"):
            Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        options = self.connection.client.transport_options
        saved = {key: options.pop(key) for key in _LOCAL_OPTIONS if key in options}
        try:
            return super()._engine_from_config()
        finally:
            options.update(saved)


class EmbeddedTransport(SqlaTransport):
    """SQLite message store; polled every ``polling_interval`` seconds (0.1 s by default)."""

    Channel = EmbeddedChannel
    polling_interval = POLLING_INTERVAL_SECONDS


TRANSPORT_PATH = f"{__name__}:EmbeddedTransport"


def embedded_broker_url(data_dir: Path) -> str:
    return f"{EMBEDDED_SCHEME}:///{(Path(data_dir) / 'broker' / 'broker.sqlite').resolve()}"


def is_embedded(url: str) -> bool:
    return url.startswith(EMBEDDED_SCHEME + ":")


def embedded_transport_options() -> dict[str, Any]:
    # NullPool: no SQLite connection is ever shared between the worker's parent and its forked pool children.
    return {"poolclass": NullPool, "connect_args": {"timeout": 30}, "polling_interval": POLLING_INTERVAL_SECONDS}


def prepare_embedded_broker(url: str) -> None:
    """Create the SQLite file and the transport's tables once, before several processes race to do it."""
    from kombu import Connection

    Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    with Connection(url, transport=EmbeddedTransport, transport_options=embedded_transport_options()) as connection:
        connection.default_channel  # noqa: B018 - opening the channel creates the tables


def prune_consumed_messages(url: str) -> int:
    """Delete messages already handed to a worker (the transport only marks them invisible)."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
    try:
        with engine.begin() as connection:
            result = connection.execute(text("DELETE FROM kombu_message WHERE visible = 0"))
            return int(result.rowcount or 0)
    except OperationalError:  # tables not created yet
        return 0
    finally:
        engine.dispose()
