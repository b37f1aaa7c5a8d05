"""The ``dicom_node.deliver`` Celery task: a thin shell around ``dicom_node.delivery.pipeline.deliver_job``.

The task never imports torch. When the report says a destination must be retried, the task re-schedules itself
with the report's backoff (``self.retry(countdown=...)``); attempts and give-up are counted in the job database by
the pipeline (each destination's ``max_attempts``), so Celery's own retry limit is switched off.

The pipeline is imported with this module, which the worker does before it forks its pool, and warmed up there
(``worker_init``: one made-up SEG and SR built), so no delivery pays the imports (seconds) or the libraries' first
use (about a second) in the pool processes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from celery.signals import worker_init

from dicom_node.delivery.pipeline import deliver_job, warm_up
from dicom_node.workers.context import get_context

log = logging.getLogger(__name__)


@worker_init.connect(weak=False)
def _warm_up(**_: Any) -> None:
    started = time.perf_counter()
    try:
        warm_up()
    except Exception:  # an optimisation only: the first delivery is slower, nothing else
        log.warning("could not warm up the result builders", exc_info=True)
        return
    log.info("result builders warmed up in %.1f s", time.perf_counter() - started)


@shared_task(bind=True, name="dicom_node.deliver", acks_late=True, max_retries=None)
def deliver(self: Any, job_id: int, force: bool = False) -> dict[str, Any]:
    context = get_context()
    report = deliver_job(context.db, context.settings, job_id, force=force)
    log.info(
        "deliver job %s: %s (stored %s, failed %s, retry %s)",
        job_id,
        report.state,
        report.stored,
        sorted(report.failed),
        report.retry,
    )
    if report.retry_in_seconds is not None:
        # Retries never force: destinations that already stored the results are not sent to again.
        raise self.retry(args=(job_id,), kwargs={"force": False}, countdown=report.retry_in_seconds)
    return {
        "job_id": job_id,
        "state": report.state,
        "stored": report.stored,
        "failed": report.failed,
        "seconds_complete_to_stored": report.seconds_complete_to_stored,
    }
