"""The Celery application: queues, reliability settings and the dispatcher that sends job messages.

Queues: one per installed detector (its ``DetectorSpec.queue``: ``brain_mri``, ``chest_xray``) and ``delivery``,
each on its own direct exchange. Triage rules put a job in the urgent lane: the same queue with broker priority 0
instead of 5 (Redis keeps one list per priority step and a worker always takes from the most urgent list first).
Deliveries first: every delivery message has priority 0 and ``delivery`` is the first queue a worker reads, so a
worker whose pool process finishes a detection takes a waiting delivery before the next detection of a backlog
(docs/workers.md, "Deliveries first"). Messages are acknowledged after the task ran (``acks_late``) and requeued
when a worker process dies (``reject_on_worker_lost``); each worker process reserves one message at a time
(``prefetch 1``) so a long MR series never holds back a short one queued behind it on another worker.

The broker is Redis in production (``broker.url: redis://host:6379/0``) and the embedded SQLite broker otherwise
(``workers.broker``). Either way the job database is the source of truth; the broker only carries hints.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from dicom_node.config import Settings
from dicom_node.db import Job
from dicom_node.models import registry as detector_registry
from dicom_node.workers.broker import (
    TRANSPORT_PATH,
    embedded_broker_url,
    embedded_transport_options,
    is_embedded,
)

DETECT_TASK = "dicom_node.detect"
DELIVER_TASK = "dicom_node.deliver"
DELIVERY_QUEUE = "delivery"
DELIVERY_PRIORITY = 0  # the most urgent step: a finished detection's results go out before the next detection
DELIVERY_TASKS_MODULE = "dicom_node.workers.delivery_tasks"

# A message that cannot be sent fails fast: the job stays queued in the database and the sweeper sends it again.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def delivery_tasks_available() -> bool:
    """Whether ``dicom_node.deliver`` (the results/delivery package) is installed in this tree."""
    return importlib.util.find_spec(DELIVERY_TASKS_MODULE) is not None


def broker_url(settings: Settings, override: str | None = None) -> str:
    return override or settings.broker.url or embedded_broker_url(settings.node.data_dir)


def detection_queues() -> tuple[str, ...]:
    """One queue per installed detector (models/registry.py), in detector name order."""
    return tuple(dict.fromkeys(queue_for(name) for name in detector_registry.names()))


def queue_detectors(queues: Sequence[str]) -> list[str]:
    """The installed detectors whose jobs go to one of ``queues``."""
    return [name for name in detector_registry.names() if queue_for(name) in queues]


def default_queues(settings: Settings) -> list[str]:
    """The queues a worker consumes when not told: every enabled detector, and delivery when it is installed."""
    enabled = [name for name in detector_registry.names() if settings.detector(name).enabled]
    queues = list(dict.fromkeys(queue_for(name) for name in enabled))
    if delivery_tasks_available():
        queues.insert(0, DELIVERY_QUEUE)
    return queues


def deliveries_first(queues: list[str]) -> list[str]:
    """The delivery queue first: Redis reads a worker's queues in this order within each priority step."""
    return sorted(queues, key=lambda name: name != DELIVERY_QUEUE)


def queue_for(detector: str) -> str:
    """The queue of ``detector``'s jobs (its spec's; the name itself for a detector no longer installed)."""
    try:
        return detector_registry.spec(detector).queue
    except detector_registry.UnknownDetectorError:
        return detector


def _limit_names() -> list[str]:
    return detector_registry.names() or [""]  # no detector installed: the default limits


def _transport_options(settings: Settings, url: str) -> dict[str, Any]:
    if is_embedded(url):
        return embedded_transport_options()
    longest = max(settings.detector(name).time_limit_seconds for name in _limit_names())
    return {
        # Redis: one list per priority step, the most urgent first (0 = urgent, 5 = normal).
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
        # An unacknowledged message goes back to its queue after this long. It must exceed the longest task;
        # a worker killed outright is covered sooner by the sweeper (lease expiry).
        "visibility_timeout": max(3600.0, 2 * longest + settings.workers.lease_seconds),
    }


def create_app(settings: Settings, *, broker: str | None = None) -> Celery:
    """The Celery app for ``settings``; ``broker`` overrides ``settings.broker.url``."""
    url = broker_url(settings, broker)
    embedded = is_embedded(url)
    app = Celery("dicom_node", set_as_current=True)
    include = ["dicom_node.workers.tasks"]
    if delivery_tasks_available():
        include.append(DELIVERY_TASKS_MODULE)
    limits = [settings.detector(name) for name in _limit_names()]
    app.conf.update(
        broker_url=url,
        broker_transport=TRANSPORT_PATH if embedded else None,
        broker_transport_options=_transport_options(settings, url),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend=settings.broker.result_backend,
        task_ignore_result=settings.broker.result_backend is None,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (DELIVERY_QUEUE, *detection_queues())
        ],
        task_create_missing_queues=True,
        task_default_queue=DELIVERY_QUEUE,
        task_routes={DELIVER_TASK: {"queue": DELIVERY_QUEUE}},
        # Backstops; each detection message carries its own detector's limits (CeleryDispatcher).
        task_soft_time_limit=max(limit.soft_time_limit_seconds for limit in limits),
        task_time_limit=max(limit.time_limit_seconds for limit in limits),
        # The embedded transport has no fan-out, which remote control needs.
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        worker_hijack_root_logger=True,
        include=include,
    )
    app.conf.dicom_node_settings = settings
    return app


class CeleryDispatcher:
    """``dicom_node.jobs.dispatch.Dispatcher`` over a Celery app: messages by task name, so the sender imports no
    task."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def enqueue_detection(self, job: Job, *, countdown: float | None = None) -> str:
        limits = self.settings.detector(job.detector)
        result = self.app.send_task(
            DETECT_TASK,
            args=[job.id],
            queue=queue_for(job.detector),
            priority=job.priority,
            countdown=countdown,
            soft_time_limit=limits.soft_time_limit_seconds,
            time_limit=limits.time_limit_seconds,
            retry=True,
            retry_policy=SEND_RETRY_POLICY,
        )
        return str(result.id)

    def enqueue_delivery(self, job: Job, *, force: bool = False) -> str:
        result = self.app.send_task(
            DELIVER_TASK,
            args=[job.id],
            kwargs={"force": True} if force else {},
            queue=DELIVERY_QUEUE,
            priority=DELIVERY_PRIORITY,
            retry=True,
            retry_policy=SEND_RETRY_POLICY,
        )
        return str(result.id)
