"""The receive service behind the C-STORE handler: spool the instance durably, then record it.

The SCP's handler only calls :meth:`InstanceReceiver.receive` and returns the status it gets (PS3.4 B.2.3).
"""

from __future__ import annotations

import errno
import logging
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from dicom_node.storage.spool import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, RejectedInstance, Spool, StoredInstance
from dicom_node.studies.records import InstanceRecorder, Peer

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1: "Error: Cannot understand" is 0xCxxx; 0xC211 marks a failure of the node itself.
STATUS_PROCESSING_FAILURE = 0xC211


class InstanceReceiver:
    """Spools and records each instance: the file's fsync runs on an I/O thread while the header is parsed, the
    directories are synced once it is placed, and only then is its row recorded (a commit shared with other
    associations, dicom_node/db/batch.py). A recorded instance is always durable on disk, and Success is answered
    only once both file and row are."""

    def __init__(self, spool: Spool, recorder: InstanceRecorder, io_threads: int = 8) -> None:
        self.spool = spool
        self.recorder = recorder
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="spool-io")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def receive(self, dataset_path: Path, peer: Peer, affected_sop_instance_uid: str | None = None) -> int:
        """Store and record one received data set; returns the C-STORE status to answer."""
        data_synced = self._io.submit(self.spool.sync_file, dataset_path)  # the bytes are all written already
        try:
            header = self.spool.inspect(dataset_path, affected_sop_instance_uid)
            data_synced.result()
            placement = self.spool.place(dataset_path, header)
        except RejectedInstance as err:
            log.warning(
                "C-STORE from %s refused with 0x%04X: %s (SOP Instance %s)",
                peer.calling_ae_title,
                err.status,
                err.reason,
                affected_sop_instance_uid,
            )
            wait([data_synced])
            self.record_refusal(peer, err.status, err.reason, affected_sop_instance_uid)
            return err.status
        except OSError as err:
            log.error("C-STORE from %s: cannot write the spool: %s", peer.calling_ae_title, err.strerror)
            wait([data_synced])
            status = STATUS_OUT_OF_RESOURCES if err.errno in (errno.ENOSPC, errno.EDQUOT) else STATUS_PROCESSING_FAILURE
            self.record_refusal(peer, status, f"cannot write the spool: {err.strerror}", affected_sop_instance_uid)
            return status
        stored = StoredInstance(header, placement.path, placement.size_bytes, placement.already_on_disk)
        try:
            # The directory entries are durable before the transaction starts: under concurrent associations the
            # database's write lock is never held while waiting for the disk.
            self.spool.sync_dirs(placement)
            recorded = self.recorder.record(stored, peer)
        except Exception:  # noqa: BLE001 - the sender gets a failure status and will retry; we stay up
            log.exception(
                "C-STORE from %s: recording SOP Instance %s failed", peer.calling_ae_title, header.sop_instance_uid
            )
            return STATUS_PROCESSING_FAILURE
        h = stored.header
        if recorded.duplicate:
            log.info("duplicate SOP Instance %s from %s (stored once)", h.sop_instance_uid, peer.calling_ae_title)
        elif recorded.after_completion:
            log.info(
                "late SOP Instance %s for completed study %s from %s: study re-opened",
                h.sop_instance_uid,
                h.study_instance_uid,
                peer.calling_ae_title,
            )
        else:
            log.debug(
                "stored SOP Instance %s (study %s, series %s) from %s",
                h.sop_instance_uid,
                h.study_instance_uid,
                h.series_instance_uid,
                peer.calling_ae_title,
            )
        return STATUS_SUCCESS

    def record_refusal(self, peer: Peer, status: int, reason: str, sop_instance_uid: str | None) -> None:
        """An ``instance_refused`` audit event, so the job database says what was refused and why."""
        try:
            self.recorder.audit(
                "instance_refused", peer, None, f"0x{status:04X}: {reason} (SOP Instance {sop_instance_uid or '?'})"
            )
        except Exception:  # noqa: BLE001 - the refusal stands and is in the log; the database may be the cause
            log.exception("cannot record the refusal of SOP Instance %s", sop_instance_uid)
