"""The receive service behind the C-STORE handler: spool the instance durably, then record it.

The SCP's handler only calls :meth:`InstanceReceiver.receive` and returns the status it gets (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dicom_node.storage.spool import STATUS_SUCCESS, RejectedInstance, Spool
from dicom_node.studies.records import InstanceRecorder, Peer

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1: "Error: Cannot understand" is 0xCxxx; 0xC211 marks a failure of the node itself.
STATUS_PROCESSING_FAILURE = 0xC211


class InstanceReceiver:
    def __init__(self, spool: Spool, recorder: InstanceRecorder) -> None:
        self.spool = spool
        self.recorder = recorder

    def receive(self, dataset_path: Path, peer: Peer, affected_sop_instance_uid: str | None = None) -> int:
        """Store and record one received data set; returns the C-STORE status to answer."""
        try:
            stored = self.spool.store(dataset_path, affected_sop_instance_uid)
        except RejectedInstance as err:
            log.warning(
                "C-STORE from %s refused with 0x%04X: %s (SOP Instance %s)",
                peer.calling_ae_title,
                err.status,
                err.reason,
                affected_sop_instance_uid,
            )
            return err.status
        except OSError as err:
            log.error("C-STORE from %s: cannot write the spool: %s", peer.calling_ae_title, err.strerror)
            return 0xA700 if err.errno in (28, 122) else STATUS_PROCESSING_FAILURE  # ENOSPC, EDQUOT
        try:
            recorded = self.recorder.record(stored, peer)
        except Exception:  # noqa: BLE001 - the sender gets a failure status and will retry; we stay up
            log.exception("C-STORE from %s: recording SOP Instance %s failed", peer.calling_ae_title,
                          stored.header.sop_instance_uid)
            return STATUS_PROCESSING_FAILURE
        h = stored.header
        if recorded.duplicate:
            log.info("duplicate SOP Instance %s from %s (stored once)", h.sop_instance_uid, peer.calling_ae_title)
        elif recorded.after_completion:
            log.info("late SOP Instance %s for completed study %s from %s: study re-opened",
                     h.sop_instance_uid, h.study_instance_uid, peer.calling_ae_title)
        else:
            log.debug("stored SOP Instance %s (study %s, series %s) from %s",
                      h.sop_instance_uid, h.study_instance_uid, h.series_instance_uid, peer.calling_ae_title)
        return STATUS_SUCCESS
