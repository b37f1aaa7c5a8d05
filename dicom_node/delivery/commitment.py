"""Storage Commitment Push Model SCU (PS3.4 Annex J): ask the PACS to take responsibility for what was sent.

After the C-STOREs succeed, the node sends N-ACTION (Action Type ID 1, "Request Storage Commitment") with a new
Transaction UID and the SOP Class/Instance UIDs it stored, then waits for the N-EVENT-REPORT: on the same
association, or (PS3.4 J.3.3.1.3: the SCU must accept it on another one) on an association the PACS opens to the
node's AE title at ``profile.storage_commitment_port`` while the node waits. Event Type 1 → committed; Event Type 2
→ failed, with each Failure Reason; no report within ``profile.storage_commitment_timeout_seconds`` → retry (the
instances are sent again with the same UIDs, and commitment is asked again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_node.config import Destination
from dicom_node.delivery.scu import ScuTimeouts
from dicom_node.delivery.transfer import SendOutcome

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # well-known SOP Instance (PS3.4 J.3.2)
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


class _Reports:
    """N-EVENT-REPORTs received, by Transaction UID (filled from pynetdicom's threads)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[int, Dataset]] = {}
        self._changed = threading.Condition()

    def on_event_report(self, event: Event) -> tuple[int, None]:
        info = event.event_information
        uid = str(info.get("TransactionUID", ""))
        with self._changed:
            self._reports[uid] = (int(event.event_type or 0), info)
            self._changed.notify_all()
        return 0x0000, None

    def wait(self, transaction_uid: str, timeout: float) -> tuple[int, Dataset] | None:
        with self._changed:
            self._changed.wait_for(lambda: transaction_uid in self._reports, timeout=timeout)
            return self._reports.get(transaction_uid)


def _request(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    request = Dataset()
    request.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    request.ReferencedSOPSequence = items
    return request


def _outcome(report: tuple[int, Dataset] | None, count: int, timeout: float) -> SendOutcome:
    if report is None:
        return SendOutcome("retry", None, f"no storage commitment report within {timeout:.0f} s")
    event_type, info = report
    if event_type == 1:
        return SendOutcome("stored", 0x0000, f"storage commitment confirmed for {count} instance(s)")
    failed = info.get("FailedSOPSequence", [])
    reasons = ", ".join(
        f"{item.ReferencedSOPInstanceUID} (reason 0x{int(item.get('FailureReason', 0)):04X})" for item in failed
    )
    return SendOutcome("failed", None, f"storage commitment refused for {len(failed)} instance(s): {reasons}")


def request_commitment(
    destination: Destination,
    references: Sequence[Reference],
    *,
    calling_ae: str,
    timeouts: ScuTimeouts | None = None,
) -> SendOutcome:
    """Ask ``destination`` to commit ``references`` and wait for its answer."""
    timeouts = timeouts or ScuTimeouts()
    profile = destination.profile
    wait = profile.storage_commitment_timeout_seconds
    reports = _Reports()
    handlers: list[Any] = [(evt.EVT_N_EVENT_REPORT, reports.on_event_report)]
    listener = None
    if profile.storage_commitment_port is not None:
        # The PACS may open its own association to deliver the report; it is the SCP of the service and proposes
        # that role (SCP/SCU Role Selection, PS3.7 D.3.3.4).
        listening = AE(ae_title=calling_ae)
        listening.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, TRANSFER_SYNTAXES, scu_role=False, scp_role=True)
        listener = listening.start_server(
            (profile.storage_commitment_bind_address, profile.storage_commitment_port),
            block=False,
            evt_handlers=handlers,
        )
    try:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts.acse, timeouts.dimse, timeouts.network
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, TRANSFER_SYNTAXES)
        assert destination.host and destination.port and destination.ae_title
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=handlers)
        if not assoc.is_established:
            return SendOutcome("retry", None, "no association for storage commitment")
        transaction_uid = generate_uid()
        try:
            status, _ = assoc.send_n_action(
                _request(transaction_uid, references), 1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )
            if "Status" not in status:
                return SendOutcome("retry", None, "no N-ACTION response (connection lost or timed out)")
            if int(status.Status) != 0x0000:
                code = int(status.Status)
                return SendOutcome("failed", code, f"storage commitment request refused: 0x{code:04X}")
            # Give the PACS a moment to answer on this association before releasing it.
            report = reports.wait(transaction_uid, min(2.0, wait))
        finally:
            if assoc.is_established:
                assoc.release()
        if report is None and listener is not None:
            report = reports.wait(transaction_uid, wait)
        outcome = _outcome(report, len(references), wait)
        log.info("storage commitment at %s (transaction %s): %s", destination.name, transaction_uid, outcome.outcome)
        return outcome
    finally:
        if listener is not None:
            listener.shutdown()
