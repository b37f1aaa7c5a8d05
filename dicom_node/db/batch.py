"""Transactions that survive a busy SQLite, and group commit for the receive path.

Every instance the node acknowledges has its row committed first, and with SQLite in WAL mode with
``synchronous=FULL`` every commit is an fsync of the log. :class:`GroupCommit` lets the receive threads of one
process share transactions: units of work that arrive while a commit is running go into the next one together, so
ten associations at once cost a few fsyncs and a few write-lock hand-overs per batch instead of one per instance, and
each sender still gets its answer only after its own row is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.db.session import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


def with_retry(db: Database, work: Callable[[Session], T], attempts: int = 8, deadline: float | None = None) -> T:
    """Run ``work`` in a transaction, retrying when SQLite reports the database locked by another process; no new
    attempt starts after ``deadline`` (time.monotonic())."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            with db.session() as session:
                return work(session)
        except OperationalError as err:
            late = deadline is not None and time.monotonic() + delay >= deadline
            if "locked" not in str(err).lower() or attempt == attempts - 1 or late:
                raise
            log.warning("job database busy, retrying (%s)", type(err.orig).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


@dataclass
class Attempt:
    """One try at committing a batch: ``scratch`` holds what the units of this try share (it starts empty again
    when the batch is rolled back and tried again)."""

    scratch: dict[str, Any] = field(default_factory=dict)


# A unit of work: its statements in the shared transaction; what it returns is handed to its caller after COMMIT.
Work = Callable[[Session, Attempt], T]


@dataclass
class _Unit(Generic[T]):
    work: Work[T]
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None

    def finish(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _UnitFailed(Exception):
    """Rolls back the batch so that the others can be committed without the unit that failed."""

    def __init__(self, unit: _Unit[Any], error: Exception) -> None:
        super().__init__(str(error))
        self.unit, self.error = unit, error


class GroupCommit:
    """A committer thread that runs the units of work handed to :meth:`run` (from any thread) in shared
    transactions, at most ``max_batch`` at a time.

    A unit that raises gets its error and the batch is tried again without it (rolled back first: no unit's
    partial statements are ever committed). A database error of the batch as a whole (a lock not obtained within
    the deadline, a connection lost) goes to every unit in it."""

    def __init__(self, db: Database, max_batch: int = 64, deadline_seconds: float | None = None) -> None:
        self.db = db
        self.max_batch = max_batch
        self.deadline_seconds = deadline_seconds
        self._queue: queue.SimpleQueue[_Unit[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued behind the last item, close()'s None
        self._thread = threading.Thread(target=self._serve, name="group-commit", daemon=True)
        self._thread.start()

    def run(self, work: Work[T]) -> T:
        """Run ``work`` in a transaction shared with others; returns once that transaction is committed."""
        unit: _Unit[T] = _Unit(work)
        with self._closing:
            if self._closed:
                raise RuntimeError("the group commit is closed")
            self._queue.put(unit)
        unit.done.wait()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]

    def close(self) -> None:
        """Commit what is queued, then stop; later :meth:`run` calls raise RuntimeError."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            unit = self._queue.get()
            if unit is None:
                return
            batch = [unit]
            closing = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            self._commit(batch)
            if closing:
                return

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        pending = list(batch)
        deadline = None if self.deadline_seconds is None else time.monotonic() + self.deadline_seconds
        while pending:
            try:
                results = with_retry(self.db, lambda session: _run_units(session, pending), deadline=deadline)
            except _UnitFailed as failed:
                failed.unit.finish(error=failed.error)
                pending.remove(failed.unit)
                continue
            except Exception as err:  # noqa: BLE001 - every unit of the batch answers with it
                for unit in pending:
                    unit.finish(error=err)
                return
            for unit, result in zip(pending, results, strict=True):
                unit.finish(result)
            return


def _run_units(session: Session, units: list[_Unit[Any]]) -> list[Any]:
    attempt = Attempt()
    results = []
    for unit in units:
        try:
            results.append(unit.work(session, attempt))
        except OperationalError:
            raise  # the batch's: retried as a whole, or every unit gets it
        except Exception as err:  # noqa: BLE001 - this unit's; the others go on
            raise _UnitFailed(unit, err) from err
    return results
