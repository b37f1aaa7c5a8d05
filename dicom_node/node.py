"""Composition of the running services of ``dicom-node serve``.

A :class:`Node` owns the job database and a list of services, each with ``start()`` and ``stop()``: started in
order, stopped in reverse. The receive path contributes the Storage SCP and the completion monitor; other parts of
the node add theirs (workers, HTTP API) with :meth:`Node.add_service`, and subscribe to completed studies with
:meth:`Node.add_study_complete_callback` (contract: called with the Study id after the completion is committed).
"""

from __future__ import annotations

import errno
import logging
import tempfile
from collections.abc import Sequence
from typing import Protocol

from dicom_node.config import Settings
from dicom_node.db import Database
from dicom_node.network.scp import StorageSCP
from dicom_node.storage.receiver import InstanceReceiver
from dicom_node.storage.spool import Spool
from dicom_node.studies.completion import CompletionMonitor, StudyCompleteCallback
from dicom_node.studies.records import InstanceRecorder

log = logging.getLogger(__name__)

# Errors of binding the listening socket (in use, not an address of this host, privileged port), as opposed to, say,
# a TLS certificate file that cannot be read.
_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class Node:
    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        storage = settings.storage
        self.spool = Spool(settings.spool_dir, storage.min_free_bytes, storage.max_inflated_bytes)
        # The receive path's own engine: its lock waits end before the sender's DIMSE timeout, so a locked
        # database gives the sender 0xC211 (retry later) instead of no answer.
        self.receive_db = Database(
            settings.database_url, upgrade=False, lock_timeout_seconds=storage.record_deadline_seconds
        )
        self.recorder = InstanceRecorder(self.receive_db, deadline_seconds=storage.record_deadline_seconds)
        self.receiver = InstanceReceiver(self.spool, self.recorder)
        self.scp = StorageSCP(settings.node, settings.network, self.receiver, self.recorder)
        self.study_complete_callbacks: list[StudyCompleteCallback] = []
        self.completion = CompletionMonitor(
            db=self.db,
            settings=settings.completion,
            selection_rules=settings.selection.rules,
            on_study_complete=self.study_complete_callbacks,
            enabled_detectors=[name for name, d in settings.detectors.items() if d.enabled],
        )
        # The monitor first, so studies left receiving by a previous run complete even before anything arrives.
        self.services: list[Service] = [self.completion, self.scp]
        self._started: list[Service] = []

    def add_service(self, service: Service) -> None:
        self.services.append(service)

    def add_study_complete_callback(self, callback: StudyCompleteCallback) -> None:
        self.study_complete_callbacks.append(callback)

    def start(self) -> None:
        self.settings.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        self.recorder.recover_open_associations()
        # pynetdicom's chunked receive writes each data set to a NamedTemporaryFile; placing those in the spool's
        # file system lets the spool publish them with a hard link instead of a copy. Process-wide, set once here.
        tempfile.tempdir = str(self.spool.incoming_dir)
        for service in self.services:
            try:
                service.start()
            except OSError as err:
                if service is self.scp and err.errno in _LISTEN_ERRNOS and err.filename is None:
                    where = f"{self.settings.node.bind_address}:{self.settings.node.port}"
                    raise OSError(err.errno, f"DICOM service could not listen on {where}: {err.strerror}") from err
                raise
            self._started.append(service)

    def stop(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception:  # noqa: BLE001 - stop the rest regardless
                log.exception("stopping %r failed", service)
        self.receiver.close()
        self.receive_db.dispose()
        self.db.dispose()


def build_node(
    settings: Settings,
    services: Sequence[Service] = (),
    on_study_complete: Sequence[StudyCompleteCallback] = (),
) -> Node:
    node = Node(settings)
    # The admin API, web page and /metrics (http.port 0 disables); imported here so the receive path alone needs
    # neither FastAPI nor Celery.
    from dicom_node.admin.service import admin_service

    http = admin_service(settings, node.db)
    if http is not None:
        node.add_service(http)
    for service in services:
        node.add_service(service)
    for callback in on_study_complete:
        node.add_study_complete_callback(callback)
    return node
