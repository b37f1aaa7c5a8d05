"""The admin HTTP service of ``dicom-node serve``: uvicorn serving ``create_app`` in a thread, with start/stop.

When no token is configured (``http.read_tokens`` and ``http.admin_tokens`` both empty) the service does not run an
open API: it creates one admin token, keeps it in ``<data_dir>/http-admin-token`` (mode 0600, reused on restart) and
logs where it is, never the token itself.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import uvicorn

from dicom_node.admin.actions import AdminActions, JobActions
from dicom_node.admin.api import create_app
from dicom_node.config import Settings
from dicom_node.db import Database

log = logging.getLogger(__name__)

TOKEN_FILE = "http-admin-token"


def ensure_token(settings: Settings) -> Settings:
    """``settings`` unchanged when tokens are configured, else a copy with the generated admin token."""
    if settings.http.read_tokens or settings.http.admin_tokens:
        return settings
    path = Path(settings.node.data_dir) / TOKEN_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        token = path.read_text(encoding="utf-8").strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
    log.warning("no http tokens configured: using the admin token in %s", path.resolve())
    http = settings.http.model_copy(update={"admin_tokens": [token]})
    return settings.model_copy(update={"http": http})


def celery_actions(settings: Settings, db: Database) -> AdminActions | None:
    """The admin actions over the node's Celery broker, or None (actions answer 503) when the worker package is
    not installed in this process."""
    try:
        from dicom_node.workers.app import CeleryDispatcher
        from dicom_node.workers.app import create_app as create_celery_app
        from dicom_node.workers.versions import model_card_versions
    except ImportError as err:
        log.warning("admin actions disabled: the workers package is not available (%s)", err)
        return None
    dispatcher = CeleryDispatcher(create_celery_app(settings), settings)
    return JobActions(db, settings, dispatcher, model_version=model_card_versions(settings))


def admin_service(settings: Settings, db: Database) -> HttpService | None:
    """The HTTP service ``dicom-node serve`` runs, or None when ``http.port`` is 0 (disabled)."""
    if settings.http.port == 0:
        log.info("admin HTTP service disabled (http.port = 0)")
        return None
    return HttpService(settings, db, celery_actions(settings, db))


class HttpService:
    """Serves the admin API, web page and /metrics on ``settings.http.bind_address:port`` until ``stop()``."""

    def __init__(self, settings: Settings, db: Database, actions: AdminActions | None = None) -> None:
        if settings.http.port == 0:
            raise ValueError("http.port is 0: the admin HTTP service is disabled")
        self.settings = ensure_token(settings)
        app = create_app(self.settings, db, actions)
        config = uvicorn.Config(
            app,
            host=settings.http.bind_address,
            port=settings.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.http.bind_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.settings.http.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving in a daemon thread; returns when the socket listens. OSError when it cannot listen (for
        example the port is in use): the socket is bound here, so the error names the address and the cause."""
        host, port = self.settings.http.bind_address, self.settings.http.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as err:
            sock.close()
            # An OSError, like the SCP's, so ``dicom-node serve`` reports it in one line and exits 1.
            raise OSError(err.errno, f"admin HTTP service could not listen on {host}:{port}: {err.strerror}") from err
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="admin-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"admin HTTP service on {host}:{port} did not start")
            time.sleep(0.05)
        log.info("admin API, web page and /metrics on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
