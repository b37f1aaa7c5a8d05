"""The detection job state machine; the job database is the source of truth, the broker only carries hints.

Lifecycle (``JobState``)::

    queued ──lease──▶ running ──▶ succeeded ──▶ delivered | delivery_failed
      ▲                  │   └──▶ failed (reason)
      └── retry/expired ─┘
    any state ──▶ superseded (a new instance set of the same series replaced the job)

Every state change, delivery's included, goes through ``lifecycle.transition``: a compare-and-set checked against
the table of allowed transitions and recorded as a ``JobEvent`` in the same transaction. Broker messages are sent
only after the transaction that created or re-queued the job has committed; a message that is lost (worker killed,
Redis restarted or flushed) is re-sent by the sweeper, and a message that arrives twice finds the job no longer
queued and does nothing.

Modules, one responsibility each:

* ``lifecycle``: the transition table, ``transition`` (the one writer of ``Job.state``), job events;
* ``identity``: what a result is (result key, instance-set hash, model version);
* ``urgency``: the urgent lane (``workers.urgent_rules``);
* ``dispatch``: the ``Dispatcher`` protocol and the detection / delivery messages;
* ``scheduler``: completed studies become jobs (``JobScheduler``);
* ``leases``: the worker side (take, renew, finish, release a running job);
* ``actions``: the admin's retry, re-run and redeliver;
* ``sweeper``: lost messages and dead holders.

The names below are re-exported so ``from dicom_node.jobs import X`` keeps working; new code imports from the
module. Nothing in this package imports the detectors (``dicom_node.models``), the workers, Celery or torch.
"""

from dicom_node.jobs.actions import redeliver_job, rerun_study, retry_job
from dicom_node.jobs.dispatch import Dispatcher, send_delivery, send_detection
from dicom_node.jobs.identity import UNVERSIONED, ModelVersions, compute_result_key, instance_set_hash
from dicom_node.jobs.leases import (
    Lease,
    TransientJobError,
    acquire_lease,
    backoff_seconds,
    complete_job,
    fail_job,
    release_job,
    renew_lease,
    retry_later,
    worker_name,
)
from dicom_node.jobs.lifecycle import (
    ACTIVE_STATES,
    DELIVERABLE_STATES,
    JobStateError,
    record_event,
    transition,
)
from dicom_node.jobs.scheduler import JobScheduler
from dicom_node.jobs.urgency import NORMAL_PRIORITY, URGENT_PRIORITY, is_urgent

__all__ = [
    "ACTIVE_STATES",
    "DELIVERABLE_STATES",
    "NORMAL_PRIORITY",
    "UNVERSIONED",
    "URGENT_PRIORITY",
    "Dispatcher",
    "JobScheduler",
    "JobStateError",
    "Lease",
    "ModelVersions",
    "TransientJobError",
    "acquire_lease",
    "backoff_seconds",
    "complete_job",
    "compute_result_key",
    "fail_job",
    "instance_set_hash",
    "is_urgent",
    "record_event",
    "redeliver_job",
    "release_job",
    "renew_lease",
    "rerun_study",
    "retry_job",
    "retry_later",
    "send_delivery",
    "send_detection",
    "transition",
    "worker_name",
]
