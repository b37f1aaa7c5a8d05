"""Worker liveness: heartbeats in the job database decide when a job's holder is gone; the lease is the last resort.

Each worker's main process (not a pool process, so a detector holding the GIL in native code cannot silence it)
writes one ``WorkerHeartbeat`` row every ``workers.heartbeat_seconds``: its pool process ids and the broker
messages it holds. A running job's holder is ``node#pid`` (``dicom_node.jobs.leases.worker_name``); it is gone when

* its worker stopped (warm shutdown finished), or has not beaten for the silence limit (kill -9, host lost,
  network cut): ``failover_grace_seconds`` less one sweep interval, so that the sweeper re-queues the job within
  the grace; or
* a beat taken after the job started no longer lists the pool process (kill -9 or OOM kill of the process; the
  worker's main process normally re-queues such a job at once, see ``workers.tasks.DetectRequest``).

A holder without any heartbeat row (a worker of an older version) is left to the lease.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Database, WorkerHeartbeat

HOLDER = re.compile(r"^(?P<node>.+)#(?P<pid>\d+)$")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def silence_limit(settings: Settings) -> float:
    """Seconds without a beat after which a worker is dead: the grace less one sweep (the sweeper acts within the
    grace), and never under two beats (a beat delayed by a busy database is not a death)."""
    workers = settings.workers
    return max(workers.failover_grace_seconds - workers.sweep_interval_seconds, 2 * workers.heartbeat_seconds)


def parse_holder(holder: str | None) -> tuple[str, int] | None:
    match = HOLDER.match(holder or "")
    return (match["node"], int(match["pid"])) if match else None


@dataclass(frozen=True)
class Beat:
    """What a worker's main process reports."""

    name: str
    pid: int
    queues: list[str]
    processes: list[int]
    held: list[dict[str, Any]]  # {"task": name, "job": id, "id": task id, "tag": delivery tag}
    at: datetime


def publish(db: Database, beat: Beat, *, started: bool = False) -> None:
    """Insert or update the worker's row; ``started`` (first beat of a new worker process) resets it."""
    with db.session() as session:
        row = session.get(WorkerHeartbeat, beat.name)
        if row is None:
            row = WorkerHeartbeat(name=beat.name, started_at=beat.at)
            session.add(row)
        if started:
            row.started_at = beat.at
        row.pid = beat.pid
        row.queues = ",".join(beat.queues)[:256]
        row.processes = json.dumps(beat.processes)
        row.held = json.dumps(beat.held)
        row.beat_at = beat.at
        row.stopped_at = None
        row.stop_reason = None


def mark_stopped(db: Database, name: str, pid: int, reason: str, at: datetime) -> None:
    """The worker ended (warm shutdown) or was found dead: it holds nothing any more."""
    with db.session() as session:
        row = session.get(WorkerHeartbeat, name)
        if row is not None and row.pid == pid and row.stopped_at is None:
            row.stopped_at = at
            row.stop_reason = reason
            row.held = "[]"
            row.processes = "[]"


@dataclass(frozen=True)
class Liveness:
    """The heartbeat rows of one moment, to judge many holders against."""

    rows: dict[str, WorkerHeartbeat]
    now: datetime
    silence: float

    @classmethod
    def load(cls, session: Session, settings: Settings, now: datetime) -> Liveness:
        rows = {row.name: row for row in session.scalars(select(WorkerHeartbeat))}
        for row in rows.values():
            session.expunge(row)
        return cls(rows, now, silence_limit(settings))

    def alive(self) -> list[WorkerHeartbeat]:
        return [row for row in self.rows.values() if self.silent_for(row) is None]

    def silent_for(self, row: WorkerHeartbeat) -> str | None:
        """Why the worker counts as dead, or None while it beats."""
        if row.stopped_at is not None:
            return f"worker {row.name} stopped at {_utc(row.stopped_at):%H:%M:%S} ({row.stop_reason or 'shut down'})"
        silent = (self.now - _utc(row.beat_at)).total_seconds()
        if silent > self.silence:
            return (
                f"worker {row.name} stopped beating: no heartbeat for {silent:.0f} s "
                f"(last at {_utc(row.beat_at):%H:%M:%S})"
            )
        return None

    def holder_gone(self, holder: str | None, started_at: datetime | None) -> str | None:
        """Why the job's holder is gone, or None when it lives (or nothing is known of it: the lease decides)."""
        parsed = parse_holder(holder)
        if parsed is None:
            return None
        node, pid = parsed
        row = self.rows.get(node)
        if row is None:
            return None
        if started_at is not None and row.stopped_at is None and _utc(row.started_at) > _utc(started_at):
            return f"worker {node} restarted at {_utc(row.started_at):%H:%M:%S}; process {pid} is gone"
        dead = self.silent_for(row)
        if dead is not None:
            return dead
        processes = json.loads(row.processes or "[]")  # empty: the pool could not be read at that beat
        fresh = started_at is None or _utc(row.beat_at) > _utc(started_at) + timedelta(seconds=0.5)
        if processes and fresh and pid not in processes:
            return f"pool process {pid} of {node} is gone (heartbeat at {_utc(row.beat_at):%H:%M:%S})"
        return None

    def held(self) -> set[tuple[str, int]]:
        """(task, job id) of every message a live worker holds."""
        found: set[tuple[str, int]] = set()
        for row in self.alive():
            for item in json.loads(row.held or "[]"):
                if isinstance(item, dict) and isinstance(item.get("job"), int):
                    found.add((str(item.get("task")), int(item["job"])))
        return found

    def held_tags(self) -> set[str]:
        """Broker delivery tags of the messages live workers hold."""
        tags: set[str] = set()
        for row in self.alive():
            for item in json.loads(row.held or "[]"):
                if isinstance(item, dict) and item.get("tag"):
                    tags.add(str(item["tag"]))
        return tags


def liveness(db: Database, settings: Settings, now: datetime) -> Liveness:
    with db.session() as session:
        return Liveness.load(session, settings, now)
