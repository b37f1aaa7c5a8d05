"""Looking into the broker, so the sweeper tells a lost message from one merely waiting in a long queue.

* Redis: the queue lists (``<queue>`` and ``<queue>:<priority>``) and Kombu's ``unacked`` hash (messages handed to
  a worker and not yet acknowledged, with the time in ``unacked_index``). ``forget`` removes unacknowledged
  messages that no live worker holds (their worker was killed), so none is left behind until the visibility
  timeout would return it.
* The embedded broker: the visible rows of ``kombu_message`` (a consumed message is gone from the table; the worker
  holding it reports it in its heartbeat).

A broker that does not answer gives no snapshot: the sweeper then changes nothing until it answers again.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from dicom_node.jobs.sweeper import BrokerInspector, BrokerSnapshot
from dicom_node.workers.app import DELIVERY_QUEUE, detection_queues
from dicom_node.workers.broker import is_embedded

log = logging.getLogger(__name__)

PRIORITY_STEPS = range(10)
SEP = ":"
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


def message_job(raw: dict[str, Any]) -> tuple[str, int] | None:
    """(task name, job id) of a raw Kombu message as the transports store it."""
    headers = raw.get("headers") or {}
    task = headers.get("task")
    if not task:
        return None
    try:
        body = raw.get("body", "")
        if (raw.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(task), int(args[0])
    except (ValueError, TypeError, IndexError, KeyError):
        return None


class RedisInspector:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        self.queues = [*detection_queues(), DELIVERY_QUEUE]

    def _keys(self) -> list[str]:
        return [queue if step == 0 else f"{queue}{SEP}{step}" for queue in self.queues for step in PRIORITY_STEPS]

    def snapshot(self) -> BrokerSnapshot | None:
        try:
            pipe = self.client.pipeline(transaction=False)
            keys = self._keys()
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hgetall(UNACKED)
            pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
            results = pipe.execute()
        except Exception as err:  # redis.ConnectionError and friends: the broker is away
            log.debug("broker snapshot failed: %s", err)
            return None
        queued: set[tuple[str, int]] = set()
        for items in results[: len(keys)]:
            for item in items:
                found = _parse(item)
                if found is not None:
                    queued.add(found)
        since = {_text(tag): float(score) for tag, score in results[-1]}
        unacked: dict[str, tuple[str, int | None, float]] = {}
        for tag, value in results[-2].items():
            tag = _text(tag)
            try:
                raw = json.loads(value)[0]
            except (ValueError, IndexError, TypeError):
                raw = {}
            found = message_job(raw) if isinstance(raw, dict) else None
            task, job = found if found is not None else ("", None)
            unacked[tag] = (task, job, since.get(tag, 0.0))
        return BrokerSnapshot(queued, unacked)

    def forget(self, tags: Iterable[str]) -> int:
        tags = list(tags)
        if not tags:
            return 0
        try:
            pipe = self.client.pipeline()
            pipe.hdel(UNACKED, *tags)
            pipe.zrem(UNACKED_INDEX, *tags)
            removed, _ = pipe.execute()
        except Exception as err:
            log.warning("could not remove orphaned unacknowledged messages: %s", err)
            return 0
        log.warning("removed %d unacknowledged broker message(s) that no live worker holds", removed)
        return int(removed)


class EmbeddedInspector:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 10})

    def snapshot(self) -> BrokerSnapshot | None:
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(text("SELECT payload FROM kombu_message WHERE visible = 1")).all()
        except OperationalError as err:
            log.debug("broker snapshot failed: %s", err)
            return None
        queued = {found for (payload,) in rows if (found := _parse(payload)) is not None}
        return BrokerSnapshot(queued, {})

    def forget(self, tags: Iterable[str]) -> int:
        return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(item: Any) -> tuple[str, int] | None:
    try:
        raw = json.loads(item)
    except (ValueError, TypeError):
        return None
    return message_job(raw) if isinstance(raw, dict) else None


def inspector_for(url: str) -> BrokerInspector | None:
    """An inspector for the broker at ``url``; None for a transport it cannot look into."""
    if is_embedded(url):
        return EmbeddedInspector(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisInspector(url)
    return None
