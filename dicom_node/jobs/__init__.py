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

Import from the module that holds a name. Nothing in this package imports the detectors (``dicom_node.models``),
the workers, Celery or torch.
"""
