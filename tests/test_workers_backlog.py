"""A long backlog on a real Redis: the sweeper tells "queued" from "lost" (issue 22).

300 studies wait behind a worker busy with a long job. However often the sweeper runs, every job keeps exactly one
broker message (none re-sent); messages that really are lost (removed from Redis behind the node's back) are sent
again once, and then every job again has exactly one.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from worker_harness import Node, RedisServer, wait_for
from workers_support import make_study

from dicom_node.db import JobEvent
from dicom_node.workers.app import DETECT_TASK
from dicom_node.workers.inspect import UNACKED, RedisInspector, _parse, message_job

pytestmark = [pytest.mark.slow, pytest.mark.redis]

BACKLOG = 300


def detect_messages(url: str) -> Counter[int]:
    """How many ``dicom_node.detect`` messages Redis holds per job: waiting in any queue list (every priority
    step) or handed out and not yet acknowledged. Counted one by one, so a duplicate shows."""
    inspector = RedisInspector(url)
    client = redis.Redis.from_url(url)
    found: Counter[int] = Counter()
    for key in inspector._keys():
        for item in client.lrange(key, 0, -1):
            parsed = _parse(item)
            if parsed is not None and parsed[0] == DETECT_TASK:
                found[parsed[1]] += 1
    for value in client.hgetall(UNACKED).values():
        parsed = message_job(json.loads(value)[0])
        if parsed is not None and parsed[0] == DETECT_TASK:
            found[parsed[1]] += 1
    return found


def sweep_for(node: Node, seconds: float) -> None:
    """The node's sweeper, every sweep interval, for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        node.sweeper.sweep_once()
        time.sleep(node.settings.workers.sweep_interval_seconds)


def resends(node: Node) -> dict[int, int]:
    with node.db.session() as session:
        rows = session.execute(
            select(JobEvent.job_id, func.count(JobEvent.id)).where(JobEvent.event == "resend").group_by(JobEvent.job_id)
        ).all()
    return {int(job_id): int(n) for job_id, n in rows}


def test_backlog_of_300_studies_keeps_one_message_per_job(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer
) -> None:
    # requeue_after 1 s: a message missing for 0.5 s would be re-sent, far less than the backlog waits.
    node = Node(tmp_path, sqlite_url, redis_server.url, requeue_after_seconds=1)
    try:
        worker = node.start_worker("busy@test")
        busy_study = make_study(node.db, tmp_path / "spool" / "busy", slices=1)
        node.set_behaviour(busy_study.series_uid, sleep=600)
        (busy,) = node.scheduler.on_study_complete(busy_study.study_id)
        wait_for(lambda: node.started(busy_study.series_uid), 60, "the busy job to start")

        backlog: list[int] = []
        for index in range(BACKLOG):
            made = make_study(node.db, tmp_path / "spool" / f"study-{index}", slices=1)
            backlog += node.scheduler.on_study_complete(made.study_id)
        assert len(backlog) == BACKLOG
        every = [busy, *backlog]

        # Far longer than the sweeper needs to call a message lost (two heartbeats, requeue_after_seconds).
        sweep_for(node, 6.0)
        assert detect_messages(redis_server.url) == Counter(dict.fromkeys(every, 1))
        assert resends(node) == {}
        assert node.job(busy).state.value == "running"
        assert {node.job(job_id).state.value for job_id in backlog} == {"queued"}

        # Now lose three for real: they are sent again, once each, and nothing else is.
        client = redis.Redis.from_url(redis_server.url)
        lost = backlog[100:103]
        for key in RedisInspector(redis_server.url)._keys():
            for item in client.lrange(key, 0, -1):
                parsed = _parse(item)
                if parsed is not None and parsed[1] in lost:
                    client.lrem(key, 1, item)
        assert set(detect_messages(redis_server.url)) == set(every) - set(lost)
        sweep_for(node, 6.0)
        assert detect_messages(redis_server.url) == Counter(dict.fromkeys(every, 1))
        assert resends(node) == dict.fromkeys(lost, 1)
        assert worker.process.poll() is None
    finally:
        for worker in node.workers:
            worker.kill()  # the busy job would otherwise hold a warm shutdown for ten minutes
        node.close()
