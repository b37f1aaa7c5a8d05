"""C-STORE SCU towards a PACS (PS3.4 Annex B, PS3.7 9.1.1).

One association per delivery attempt, proposing only the SOP classes being sent, each with Explicit and Implicit VR
Little Endian, and, for an object stored compressed (the Parametric Map: JPEG 2000 Lossless), a second presentation
context with its own transfer syntax: a PACS that accepts it gets the object as stored; one that does not gets it
decompressed (PS3.5 A: lossless, the same pixels). The outcome of the attempt is classified so the pipeline knows
what to do next:

* 0x0000 → ``stored``; 0xB000, 0xB006, 0xB007 → ``warning`` (stored, with coercion/elements discarded)
* no association, association aborted, 0xA7xx (out of resources) → ``retry`` with exponential backoff
* 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), other failures, permanent association
  rejection → ``failed``, with the reason; retrying would only repeat the refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicom_node.config import Destination
from dicom_node.delivery.transfer import ResultFile, SendOutcome

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # Explicit, Implicit VR Little Endian
UNCOMPRESSED = {*TRANSFER_SYNTAXES, "1.2.840.10008.1.2.2"}
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
OUTCOME_ORDER = {"stored": 0, "warning": 1, "retry": 2, "failed": 3}


def classify_status(status: int) -> str:
    if status == 0x0000:
        return "stored"
    if status in WARNING_STATUSES:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "retry"
    return "failed"


@dataclass(frozen=True)
class ScuTimeouts:
    acse: float = 30.0
    dimse: float = 120.0
    network: float = 300.0


def _worst(outcomes: Sequence[SendOutcome]) -> SendOutcome:
    return max(outcomes, key=lambda o: OUTCOME_ORDER[o.outcome])


def _associate(
    destination: Destination,
    calling_ae: str,
    sop_classes: Sequence[str],
    timeouts: ScuTimeouts,
    compressed: Sequence[tuple[str, str]] = (),
) -> tuple[Association | None, str]:
    """``compressed``: (SOP class, transfer syntax) pairs proposed in contexts of their own, besides the
    uncompressed context every SOP class gets (PS3.8 9.3.2.2: the acceptor picks one syntax per context)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    for sop_class, syntax in compressed:
        ae.add_requested_context(sop_class, syntax)
    assert destination.host and destination.port and destination.ae_title
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if assoc.is_established:
        return assoc, ""
    if assoc.is_rejected:
        # PS3.8 9.3.4: result 1 = rejected-permanent, 2 = rejected-transient.
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        source, diagnostic = getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)
        reason = f"association rejected (result {result}, source {source}, reason {diagnostic})"
        return None, ("failed:" if result == 1 else "retry:") + reason
    if assoc.is_aborted:
        return None, "retry:association aborted"
    return None, f"retry:no association with {destination.ae_title}@{destination.host}:{destination.port}"


def _as_accepted(assoc: Association, ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as stored when the PACS accepted its transfer syntax for its SOP class, else decompressed."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    if syntax in UNCOMPRESSED or (str(ds.SOPClassUID), syntax) in accepted:
        return ds
    log.info("%s: the PACS does not take %s, sending it decompressed", ds.SOPInstanceUID, syntax)
    ds.decompress()
    return ds


def describe(path: Path) -> ResultFile:
    """A file to send, known from its file meta information alone (PS3.10 7.1) when it has one."""
    meta = read_file_meta_info(path)
    if all(keyword in meta for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")):
        return ResultFile(
            path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)
        )
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return ResultFile(
        path, str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.file_meta.TransferSyntaxUID)
    )


def _send_one(assoc: Association, item: ResultFile, accepted: set[tuple[str, str]]) -> Dataset:
    """C-STORE one file. When the PACS accepted the file's own transfer syntax for its SOP class, the file's bytes
    go as they are (pynetdicom streams the data set from the file: no parsing, no encoding again); otherwise it is
    read and converted (Explicit → Implicit VR, or decompressed) as ``_as_accepted`` says."""
    if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            return assoc.send_c_store(item.path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
    return assoc.send_c_store(_as_accepted(assoc, pydicom.dcmread(item.path)))


def store_files(
    destination: Destination,
    files: Sequence[Path | ResultFile],
    *,
    calling_ae: str,
    timeouts: ScuTimeouts | None = None,
) -> SendOutcome:
    """Send ``files`` over one association and classify the attempt. A ``ResultFile`` already names its SOP class,
    instance and transfer syntax; a bare path is described from its file meta information."""
    timeouts = timeouts or ScuTimeouts()
    items = [item if isinstance(item, ResultFile) else describe(Path(item)) for item in files]
    sop_classes = sorted({item.sop_class_uid for item in items})
    compressed = sorted(
        {(item.sop_class_uid, item.transfer_syntax_uid) for item in items}
        - {(c, ts) for c in sop_classes for ts in UNCOMPRESSED}
    )
    assoc, problem = _associate(destination, calling_ae, sop_classes, timeouts, compressed)
    if assoc is None:
        outcome, _, reason = problem.partition(":")
        log.warning("delivery to %s: %s", destination.name, reason)
        return SendOutcome(outcome, None, reason)
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    outcomes: list[SendOutcome] = []
    try:
        for item in items:
            response = _send_one(assoc, item, accepted)
            if "Status" not in response:
                lost = f"no C-STORE response for {item.sop_instance_uid} (connection lost or timed out)"
                outcomes.append(SendOutcome("retry", None, lost))
                break
            status = int(response.Status)
            outcome = classify_status(status)
            comment = response.get("ErrorComment", "")
            detail = f"{item.sop_instance_uid}: 0x{status:04X} {code_to_category(status)} {comment}".rstrip()
            outcomes.append(SendOutcome(outcome, status, detail))
            log.info("C-STORE %s to %s: 0x%04X (%s)", item.sop_instance_uid, destination.name, status, outcome)
            if outcome in ("failed", "retry"):
                break
    finally:
        if assoc.is_established:
            assoc.release()
    worst = _worst(outcomes)
    if worst.outcome in ("stored", "warning"):
        statuses = ", ".join(f"0x{o.status:04X}" for o in outcomes if o.status is not None)
        return SendOutcome(worst.outcome, worst.status, f"{len(outcomes)} instance(s) stored: {statuses}")
    return worst
