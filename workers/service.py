"""What the job side adds to ``dicom-node serve``: scheduler, sweeper and the embedded workers."""

from __future__ import annotations

import logging
from typing import Protocol

from dicom_node.config import Settings
from dicom_node.db import Database
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.jobs.sweeper import SweeperService
from dicom_node.studies.completion import StudyCompleteCallback
from dicom_node.workers.app import CeleryDispatcher, broker_url, create_app, delivery_tasks_available
from dicom_node.workers.broker import is_embedded, prepare_embedded_broker, prune_consumed_messages
from dicom_node.workers.inspect import inspector_for
from dicom_node.workers.versions import model_card_versions
from dicom_node.workers.worker import EmbeddedWorkers

log = logging.getLogger(__name__)


class _Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class _NodeLike(Protocol):
    settings: Settings
    db: Database

    def add_service(self, service: _Service) -> None: ...

    def add_study_complete_callback(self, callback: StudyCompleteCallback) -> None: ...


def job_dispatcher(settings: Settings) -> CeleryDispatcher:
    """The node's one Celery app and its dispatcher (the embedded broker prepared first), shared by the scheduler,
    the sweeper and the admin actions."""
    url = broker_url(settings)
    if is_embedded(url):
        prepare_embedded_broker(url)
    return CeleryDispatcher(create_app(settings), settings)


def add_job_services(node: _NodeLike, dispatcher: CeleryDispatcher) -> JobScheduler:
    """Register the scheduler for completed studies, the sweeper, and (``workers.embedded``) embedded workers."""
    settings = node.settings
    url = broker_url(settings)
    versions = model_card_versions(settings)
    scheduler = JobScheduler(node.db, settings, dispatcher, model_version=versions)
    node.add_study_complete_callback(scheduler)
    prune = None
    if is_embedded(url):

        def prune() -> None:
            log.debug("pruned %d consumed broker messages", prune_consumed_messages(url))

    if settings.workers.embedded:
        node.add_service(EmbeddedWorkers(settings))
    else:
        log.info("embedded workers disabled; run `dicom-node worker` on this or other hosts (broker %s)",
                 "embedded" if is_embedded(url) else url.split("@")[-1])  # fmt: skip
    node.add_service(
        SweeperService(
            node.db,
            settings,
            dispatcher,
            model_version=versions,
            also=prune,
            deliveries=delivery_tasks_available(),
            inspector=inspector_for(url),
        )
    )
    return scheduler
