"""The worker's heartbeat (a bootstep of the worker's main process) and what that process does when a pool process
running a detection dies.

Every ``workers.heartbeat_seconds`` the main process writes its ``WorkerHeartbeat`` row: the pool process ids and
the broker messages it holds (unacknowledged: running, reserved, or waiting for their countdown). It is the main
process, not a pool process, so a detector stuck in native code does not silence it. On warm shutdown the row is
marked stopped. The node's sweeper reads these rows (``dicom_node.heartbeat``, ``dicom_node.jobs.sweeper``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from celery import Celery, bootsteps

from dicom_node.config import Settings
from dicom_node.db import Database, Job, JobState
from dicom_node.heartbeat import Beat, mark_stopped, publish
from dicom_node.jobs.dispatch import send_detection
from dicom_node.jobs.leases import release_job, worker_name
from dicom_node.jobs.lifecycle import JobStateError
from dicom_node.timeutil import utcnow

log = logging.getLogger(__name__)

_MAIN_DB: dict[int, Database] = {}
_INT = re.compile(r"-?\d+")

# The main process forks pool processes (again after one dies) while its heartbeat thread may be inside the
# database driver; a child forked then inherits the driver's locks held (SQLite hangs on its first statement).
# Forks wait for the database work of the main process's threads to finish.
_FORK_LOCK = threading.RLock()


def _release_in_child() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()


os.register_at_fork(
    before=lambda: _FORK_LOCK.acquire(), after_in_parent=lambda: _FORK_LOCK.release(), after_in_child=_release_in_child
)


def main_db(settings: Settings) -> Database:
    """The main process's job database: no pooled connection, so forked pool processes inherit none."""
    pid = os.getpid()
    if pid not in _MAIN_DB:
        _MAIN_DB[pid] = Database(
            settings.database_url,
            upgrade=False,
            pooled=False,
            lock_timeout_seconds=max(settings.workers.heartbeat_seconds, 5.0),
        )
    return _MAIN_DB[pid]


def _settings(app: Celery) -> Settings:
    settings = app.conf.get("dicom_node_settings")
    if not isinstance(settings, Settings):
        raise RuntimeError("the Celery app was not made by workers.app.create_app(settings)")
    return settings


def job_of_message(message: Any) -> int | None:
    """The job id a Celery message carries (its first argument)."""
    try:
        args = message.decode()[0]
        if args and isinstance(args[0], int | str):
            return int(args[0])
    except Exception:  # not protocol 2 JSON: fall back to the argsrepr header
        pass
    found = _INT.search(str((getattr(message, "headers", None) or {}).get("argsrepr", "")))
    return int(found.group()) if found else None


def held_messages(worker: Any) -> list[dict[str, Any]]:
    """The messages this worker holds unacknowledged (Kombu's QoS of the task consumer's channel)."""
    try:
        qos = worker.consumer.task_consumer.channel.qos
        delivered = list(qos._delivered.items())
        dirty = set(getattr(qos, "_dirty", ()))
    except Exception:  # the consumer is not up yet, or a transport without a virtual QoS
        return []
    held = []
    for tag, message in delivered:
        if tag in dirty:
            continue
        headers = getattr(message, "headers", None) or {}
        held.append(
            {"task": headers.get("task"), "job": job_of_message(message), "id": headers.get("id"), "tag": str(tag)}
        )
    return held


def pool_processes(worker: Any) -> list[int]:
    try:
        return [int(pid) for pid in worker.pool.info.get("processes", [])]
    except Exception:  # the pool is starting or stopping
        return []


class Heartbeat(bootsteps.StartStopStep):
    """Writes the worker's heartbeat row from a thread of the main process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        settings = _settings(worker.app)
        db = main_db(settings)
        queues = [queue.name for queue in worker.app.amqp.queues.consume_from.values()]
        name, pid, interval = worker.hostname, os.getpid(), settings.workers.heartbeat_seconds

        def beat(started: bool = False) -> None:
            at = utcnow()
            processes = pool_processes(worker)
            with _FORK_LOCK:
                publish(db, Beat(name, pid, queues, processes, held_messages(worker), at), started=started)

        try:
            beat(started=True)
        except Exception as err:
            log.warning("heartbeat: cannot write to the job database (%s); trying again", err)

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    beat()
                except Exception as err:  # the database is briefly away: the next beat may get through
                    log.warning("heartbeat: cannot write to the job database (%s)", err)

        self._thread = threading.Thread(target=run, name="dicom-node-heartbeat", daemon=True)
        self._thread.start()
        log.info("heartbeat every %g s as %s", interval, name)

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                with _FORK_LOCK:
                    mark_stopped(main_db(_settings(worker.app)), worker.hostname, os.getpid(), "shut down", utcnow())
            except Exception as err:
                log.warning("heartbeat: could not record the shutdown (%s)", err)


def release_lost_detection(
    app: Celery,
    job_id: Any,
    hostname: str | None,
    pid: int | None,
    *,
    event: str,
    reason: str,
    failure: str,
    send: bool,
) -> None:
    """A pool process running job ``job_id`` is gone (killed, or at the hard time limit): the job goes back to the
    queue at once (or fails after ``workers.max_attempts``), before Celery returns or acknowledges the message.
    ``send``: also send a new message (Celery acknowledged the old one)."""
    if pid is None or hostname is None:
        return
    try:
        with _FORK_LOCK:
            _release(app, int(job_id), hostname, pid, event=event, reason=reason, failure=failure, send=send)
    except (JobStateError, ValueError, TypeError) as err:
        log.warning("job %s: could not release it after its process was lost (%s)", job_id, err)
    except Exception:  # never break Celery's own handling of the lost process
        log.exception("job %s: could not release it after its process was lost", job_id)


def _release(
    app: Celery, job_id: int, hostname: str, pid: int, *, event: str, reason: str, failure: str, send: bool
) -> None:
    settings = _settings(app)
    db = main_db(settings)
    holder = worker_name(hostname, pid)
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.worker != holder:
            return
        attempts = job.attempts
    moved = release_job(
        db, settings, job_id, holder=holder, attempts=attempts, event=event, reason=reason, failure=failure
    )
    if moved == JobState.QUEUED and send:
        from dicom_node.workers.app import CeleryDispatcher

        send_detection(db, CeleryDispatcher(app, settings), [job_id])
