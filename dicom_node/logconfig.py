"""Logging set-up. Log lines name UIDs, AE titles and states, never patient names or IDs."""

from __future__ import annotations

import logging
import sys
import warnings

# Libraries that log at INFO per PDU or per object written; their chatter (which can include identifiers) stays at
# WARNING: pynetdicom (every PDU), highdicom (lines per SEG/SR it builds), Alembic (two lines per process start
# about its context, even when the schema is already current).
QUIET_LIBRARIES = ("pynetdicom", "highdicom", "alembic")

# Celery's warning when a worker runs as root (containers do): the workers accept JSON messages only, so the
# pickle risk it warns about does not apply (with pickle accepted Celery refuses to start as root instead).
CELERY_ROOT_WARNING = r"You're running the worker with superuser privileges"


def quiet_libraries() -> None:
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()


def prepare_worker_logging() -> None:
    """For a Celery worker process (``dicom-node worker``, also the one ``serve`` embeds), whose logging Celery sets
    up: the same quiet libraries, and no superuser-privileges warning at start (see ``CELERY_ROOT_WARNING``)."""
    from celery.exceptions import SecurityWarning

    quiet_libraries()
    warnings.filterwarnings("ignore", message=CELERY_ROOT_WARNING, category=SecurityWarning)
