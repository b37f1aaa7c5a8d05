"""Child processes that end with the node, however it ends."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent_pid: int) -> None:
    """Called in a child: have Linux send it SIGTERM when the node dies, even by SIGKILL, so it does not live on as
    an orphan beside the next node's processes. The signal follows the thread that started the child: ``serve``
    starts services from its main thread, which lives as long as the node. Nothing where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the node died before prctl took effect
        os._exit(1)


def die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """:func:`end_with_parent` as a ``subprocess`` ``preexec_fn``; None where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    return lambda: end_with_parent(parent_pid)
