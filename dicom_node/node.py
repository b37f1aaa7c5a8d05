"""Composition of the running services of ``dicom-node serve``.

A :class:`Node` owns the job database and a list of services, each with ``start()`` and ``stop()``: started in
order, stopped in reverse. The receive path contributes the receiving processes (the Storage SCP in
``network.receive_processes`` processes, :func:`run_receiver`) and the completion monitor; other parts of the node
add theirs (workers, HTTP API) with :meth:`Node.add_service`, and subscribe to completed studies with
:meth:`Node.add_study_complete_callback` (contract: called with the Study id after the completion is committed).
"""

from __future__ import annotations

import errno
import logging
import signal
import tempfile
import time
from collections.abc import Sequence
from typing import Protocol

from dicom_node.config import Settings
from dicom_node.db import Database
from dicom_node.lifetime import end_with_parent
from dicom_node.logconfig import configure_logging
from dicom_node.network.processes import ReceiverContext, ReceivingProcesses
from dicom_node.network.receiver import InstanceReceiver
from dicom_node.network.scp import SharedListener, StorageSCP, server_ssl_context
from dicom_node.storage.spool import Spool
from dicom_node.studies.completion import CompletionMonitor, StudyCompleteCallback
from dicom_node.studies.records import InstanceRecorder, recover_open_associations

log = logging.getLogger(__name__)

# Errors of binding the listening socket (in use, not an address of this host, privileged port), as opposed to, say,
# a TLS certificate file that cannot be read.
_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
# How often a receiving process looks at its flags and for its node (a start or stop waits at most this long).
_POLL_SECONDS = 0.1


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def make_spool(settings: Settings) -> Spool:
    storage = settings.storage
    return Spool(settings.spool_dir, storage.min_free_bytes, storage.max_inflated_bytes)


class Node:
    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.spool = make_spool(settings)
        self.receivers = ReceivingProcesses(
            (settings.node.bind_address, settings.node.port),
            count=settings.network.receive_processes,
            max_associations=settings.network.max_associations,
            target=run_receiver,
            settings=settings,
        )
        self.study_complete_callbacks: list[StudyCompleteCallback] = []
        self.completion = CompletionMonitor(
            db=self.db,
            settings=settings.completion,
            selection_rules=settings.selection.rules,
            on_study_complete=self.study_complete_callbacks,
            enabled_detectors=[name for name, d in settings.detectors.items() if d.enabled],
        )
        # The monitor first, so studies left receiving by a previous run complete even before anything arrives.
        self.services: list[Service] = [self.completion, self.receivers]
        self._started: list[Service] = []

    @property
    def port(self) -> int:
        return self.receivers.port

    def add_service(self, service: Service) -> None:
        self.services.append(service)

    def add_study_complete_callback(self, callback: StudyCompleteCallback) -> None:
        self.study_complete_callbacks.append(callback)

    def start(self) -> None:
        self.settings.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        recover_open_associations(self.db)
        if self.settings.network.tls.enabled:
            server_ssl_context(self.settings.network.tls)  # an unreadable certificate is a start-up error here
        for service in self.services:
            try:
                service.start()
            except OSError as err:
                if service is self.receivers and err.errno in _LISTEN_ERRNOS and err.filename is None:
                    where = f"{self.settings.node.bind_address}:{self.settings.node.port}"
                    raise OSError(err.errno, f"DICOM service could not listen on {where}: {err.strerror}") from err
                raise
            self._started.append(service)
        self.receivers.open()

    def stop(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception:  # noqa: BLE001 - stop the rest regardless
                log.exception("stopping %r failed", service)
        self.db.dispose()


def run_receiver(settings: Settings, context: ReceiverContext) -> None:
    """Body of one receiving process: the Storage SCP on the shared socket, with its own spool writer and job
    database engine, until the node says stop (or dies: SIGTERM by PR_SET_PDEATHSIG)."""
    end_with_parent(context.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the node decides
    # SIGTERM: the node died (PR_SET_PDEATHSIG) or someone asked this process to end. The handler only appends to a
    # list: a threading.Event's set() takes a lock, and a second SIGTERM arriving inside the first handler's set()
    # deadlocked the process on it (seen: a receiver left behind by a killed node, stuck in its own handler).
    terms: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: terms.append(signum))
    configure_logging(settings.logging.level)
    storage = settings.storage
    spool = make_spool(settings)
    # pynetdicom's chunked receive writes each data set to a NamedTemporaryFile; placing those in the spool's file
    # system lets the spool publish them with a hard link instead of a copy. Process-wide, set once here.
    tempfile.tempdir = str(spool.incoming_dir)
    try:
        # Its lock waits end before the sender's DIMSE timeout, so a locked database gives the sender 0xC211 (retry
        # later) instead of no answer.
        db = Database(settings.database_url, upgrade=False, lock_timeout_seconds=storage.record_deadline_seconds)
        recorder = InstanceRecorder(db, deadline_seconds=storage.record_deadline_seconds)
        receiver = InstanceReceiver(spool, recorder)
        listener = SharedListener(context.listening, context.slots, context.index)
        scp = StorageSCP(settings.node, settings.network, receiver, recorder, listener)
    except Exception as err:  # noqa: BLE001 - the node fails its start with this reason instead of waiting
        context.reports.put(("failed", context.index, f"receiving process {context.index}: {err}"))
        raise
    context.reports.put(("ready", context.index, None))

    def ended() -> bool:
        return bool(terms) or context.node_gone()

    while not (ended() or context.stop.is_set() or context.go.is_set()):
        time.sleep(_POLL_SECONDS)
    try:
        if context.go.is_set() and not ended():
            scp.start()
            while not (ended() or context.stop.is_set()):
                time.sleep(_POLL_SECONDS)
    finally:
        # The node asked (its stop flag): running associations get their grace. The node is gone (SIGTERM, or
        # handed to init): end now, as the node did; the senders send their unacknowledged instances again.
        if ended():
            scp.stop(grace_seconds=0.0)
        else:
            scp.stop()
        receiver.close()
        recorder.close()
        db.dispose()


def build_node(
    settings: Settings,
    services: Sequence[Service] = (),
    on_study_complete: Sequence[StudyCompleteCallback] = (),
) -> Node:
    node = Node(settings)
    for service in services:
        node.add_service(service)
    for callback in on_study_complete:
        node.add_study_complete_callback(callback)
    return node
