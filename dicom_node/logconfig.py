"""Logging set-up. Log lines name UIDs, AE titles and states, never patient names or IDs."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its chatter (which can include identifiers) at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
