"""The node-wide limit on associations (``network.max_associations``) across its receiving processes.

Each receiving process publishes how many associations it holds in one shared array; a new association is
accepted only when the sum stays within the limit, so the limit is the node's whole, however the kernel spreads
connections over the processes. A process that dies has its count cleared by the main process
(:meth:`AssociationSlots.clear`). The counts are recomputed from the associations still alive at every change, so
an association that ended without an event the process saw cannot hold a slot for ever.
"""

from __future__ import annotations

import logging
from multiprocessing.context import BaseContext
from typing import Any

log = logging.getLogger(__name__)

# How long to wait for the shared lock. It is held for microseconds; a process killed while holding it would block
# every other one, so after this the check is skipped (the association is accepted) with a warning.
_LOCK_TIMEOUT_SECONDS = 1.0


class AssociationSlots:
    """Shared association counts of ``processes`` receiving processes; picklable into a spawned process."""

    def __init__(self, limit: int, processes: int, context: BaseContext) -> None:
        self.limit = limit
        self._lock: Any = context.Lock()
        self._counts: Any = context.RawArray("i", processes)

    def claim(self, index: int, held: int) -> bool:
        """Process ``index`` would hold ``held`` associations with the new one: True (and published) when the node
        stays within the limit, False when the new association must be refused."""
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_SECONDS):
            log.warning("association limit not checked: the shared lock was not released")
            return True
        try:
            others = sum(self._counts) - self._counts[index]
            if others + held > self.limit:
                return False
            self._counts[index] = held
            return True
        finally:
            self._lock.release()

    def publish(self, index: int, held: int) -> None:
        """Process ``index`` now holds ``held`` associations."""
        if self._lock.acquire(timeout=_LOCK_TIMEOUT_SECONDS):
            try:
                self._counts[index] = held
            finally:
                self._lock.release()
        else:
            self._counts[index] = held  # a plain int store; better than a stale count

    def clear(self, index: int) -> None:
        """Process ``index`` is gone: its associations with it."""
        self.publish(index, 0)

    def held(self) -> int:
        return int(sum(self._counts))
