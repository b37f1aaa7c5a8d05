"""The node's DICOM listener: Verification SCP and Storage SCP for every Storage SOP Class (PS3.4 Annex A, B).

Association policy (PS3.8 7.1.1.9, A-ASSOCIATE-RJ reasons) is applied when the A-ASSOCIATE-RQ arrives:
the called AE title must be ours (rejected-permanent, service-user, "called-AE-title-not-recognized"), and when an
allow-list is configured the calling AE title (and host, if given) must be on it ("calling-AE-title-not-recognized").
pynetdicom itself refuses associations beyond ``max_associations`` (rejected-transient, service-provider
presentation, "local-limit-exceeded"). Every accepted and rejected association is an audit event with its reason.

C-STORE data sets are received to disk undecoded (pynetdicom's chunked receive); the handler only returns the
status the receive service gives it.

The SCP runs in each of the node's receiving processes (dicom_node/network/processes.py), all accepting from one
listening socket; ``max_associations`` holds for the node as a whole (dicom_node/network/slots.py), checked when
the A-ASSOCIATE-RQ arrives, so a port probe that never asks for an association holds no slot.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import NetworkSettings, NodeSettings, TlsSettings
from dicom_node.network.receiver import InstanceReceiver
from dicom_node.network.server import start_server, text_of
from dicom_node.network.slots import AssociationSlots
from dicom_node.studies.records import InstanceRecorder, Peer

log = logging.getLogger(__name__)

# Accepted transfer syntaxes (PS3.5 Section 10 and Annex A); instances are stored in the one negotiated.
TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,  # process 14
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, source 1 = DICOM UL service-user.
_REJECT_PERMANENT, _SOURCE_SERVICE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNIZED, _CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07
# Result 2 = rejected-transient, source 3 = DICOM UL service-provider (presentation), reason 2 = local-limit-exceeded.
_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02

_REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognized",
    (0x01, 0x07): "called AE title not recognized",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded (maximum associations)",
}


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS context of the BCP 195 profile (PS3.15 B.9): TLS 1.2 or newer, optional client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.certificate is not None and tls.private_key is not None  # checked by TlsSettings
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class SharedListener:
    """What a receiving process shares with the others: the listening socket, the node-wide association slots, and
    its own index in them."""

    socket: socket.socket
    slots: AssociationSlots
    index: int


class StorageSCP:
    """Accepts associations from the shared listening socket until stopped; one thread per association
    (pynetdicom)."""

    def __init__(
        self,
        node: NodeSettings,
        network: NetworkSettings,
        receiver: InstanceReceiver,
        recorder: InstanceRecorder,
        listener: SharedListener,
    ) -> None:
        self.node = node
        self.network = network
        self.receiver = receiver
        self.recorder = recorder
        self.listener = listener
        self._server: ThreadedAssociationServer | None = None
        self._held: set[Association] = set()  # associations holding one of the node's slots
        self._held_lock = threading.Lock()
        self._aborting = False
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # The node-wide limit is ours (_hold, on the A-ASSOCIATE-RQ); pynetdicom's own per-process count also
        # includes connections that never asked for an association, so it is only a backstop against a flood.
        ae.maximum_associations = 2 * self.network.max_associations + 8
        ae.acse_timeout = self.network.acse_timeout
        ae.dimse_timeout = self.network.dimse_timeout
        ae.network_timeout = self.network.network_timeout
        ae.maximum_pdu_size = self.network.maximum_pdu_size
        # The called/calling AE checks are ours (EVT_REQUESTED), so they can look at the host and audit the reason.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not listening")
        return int(self._server.server_address[1])

    def start(self) -> None:
        # Receive C-STORE data sets to a file, undecoded: memory stays flat whatever the instance size.
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        ssl_context = server_ssl_context(self.network.tls) if self.network.tls.enabled else None
        # Our server class: the TLS handshake off the accept thread, with a timeout; a C-STORE the chunked receive
        # cannot take (full disk, no Affected SOP Instance UID) still answered (dicom_node/network/server.py).
        self._server = start_server(
            self.ae,
            (self.node.bind_address, self.node.port),
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=ssl_context,
            handshake_timeout=self.network.tls_handshake_timeout,
            on_refused=self._on_refused_in_transit,
            listening=self.listener.socket,
        )
        log.info(
            "listening as %s on %s:%d (TLS %s)",
            self.node.ae_title,
            self.node.bind_address,
            self.port,
            "on" if ssl_context else "off",
        )

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop listening, let running associations finish for ``grace_seconds``, then abort the rest (their
        unacknowledged instance is sent again by the peer)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + grace_seconds
        # Only established associations can still deliver instances; a connection that never sent an
        # A-ASSOCIATE-RQ (a port probe, a health check) has nothing to finish.
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._established():
            log.warning("aborting %d association(s) still running", self._established())
        self._aborting = True  # the associations cut now were cut by the node stopping, not by their peer
        self.ae.shutdown()

    def _established(self) -> int:
        return sum(1 for assoc in self.ae.active_associations if assoc.is_established)

    # Association policy ------------------------------------------------------------------------------------------

    def rejection_reason(self, calling: str, called: str, host: str | None) -> tuple[int, str] | None:
        """The A-ASSOCIATE-RJ diagnostic and reason for a request, or None to let it through."""
        if self.network.check_called_ae_title and called != self.node.ae_title:
            return _CALLED_AE_NOT_RECOGNIZED, f"called AE title {called!r} is not {self.node.ae_title!r}"
        allowed = self.network.allowed_calling_aes
        if allowed and not any(
            peer.ae_title == calling and (peer.host is None or peer.host == host) for peer in allowed
        ):
            return _CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} from {host} is not on the allow-list"
        return None

    @staticmethod
    def _peer(event: evt.Event) -> tuple[Peer, str]:
        primitive = event.assoc.requestor.primitive
        calling = text_of(getattr(primitive, "calling_ae_title", "")) or text_of(event.assoc.requestor.ae_title)
        called = text_of(getattr(primitive, "called_ae_title", ""))
        return Peer(calling, event.assoc.requestor.address), called

    def _on_requested(self, event: evt.Event) -> None:
        peer, called = self._peer(event)
        refusal = self.rejection_reason(peer.calling_ae_title or "", called, peer.host)
        if refusal is not None:
            diagnostic, reason = refusal
            self._reject(event, peer, called, (_REJECT_PERMANENT, _SOURCE_SERVICE_USER, diagnostic), reason)
        elif not self._hold(event.assoc):
            limit = (_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)
            self._reject(event, peer, called, limit, _REJECT_REASONS[(_SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)])

    def _reject(
        self, event: evt.Event, peer: Peer, called: str, result_source_reason: tuple[int, int, int], reason: str
    ) -> None:
        log.warning("association from %s (%s) rejected: %s", peer.calling_ae_title, peer.host, reason)
        event.assoc.acse.send_reject(*result_source_reason)
        self._audit("association_rejected", peer, called, reason)
        event.assoc.kill()  # as pynetdicom does after its own rejections: stop the DUL thread

    def _hold(self, assoc: Association) -> bool:
        """Take one of the node's association slots for ``assoc``; False when all are taken."""
        with self._held_lock:
            self._held = {held for held in self._held if held.is_alive()}
            if not self.listener.slots.claim(self.listener.index, len(self._held) + 1):
                return False
            self._held.add(assoc)
            return True

    def _let_go(self, assoc: Association) -> None:
        with self._held_lock:
            self._held = {held for held in self._held if held.is_alive() and held is not assoc}
            self.listener.slots.publish(self.listener.index, len(self._held))

    def _on_accepted(self, event: evt.Event) -> None:
        peer, called = self._peer(event)
        log.info("association from %s (%s) accepted", peer.calling_ae_title, peer.host)
        self._audit("association_accepted", peer, called, None)

    def _on_rejected(self, event: evt.Event) -> None:
        # Rejections by pynetdicom itself (e.g. the maximum number of associations).
        peer, called = self._peer(event)
        rejection = event.assoc.acceptor.primitive
        key = (getattr(rejection, "result_source", 0), getattr(rejection, "diagnostic", 0))
        reason = _REJECT_REASONS.get(key, f"source {key[0]} diagnostic {key[1]}")
        log.warning("association from %s (%s) rejected: %s", peer.calling_ae_title, peer.host, reason)
        self._audit("association_rejected", peer, called, reason)
        self._let_go(event.assoc)

    def _audit(self, event_name: str, peer: Peer, called: str, reason: str | None) -> None:
        try:
            self.recorder.audit(event_name, peer, called, reason)
        except Exception:  # noqa: BLE001 - an audit failure is logged, the association policy still holds
            log.exception("cannot record audit event %s", event_name)

    # Services ---------------------------------------------------------------------------------------------------

    def _on_c_store(self, event: evt.Event) -> int:
        peer = Peer(text_of(event.assoc.requestor.ae_title), event.assoc.requestor.address, _association_key(event))
        affected = text_of(getattr(event.request, "AffectedSOPInstanceUID", "")) or None
        return self.receiver.receive(event.dataset_path, peer, affected)

    def _on_refused_in_transit(
        self, calling: str | None, host: str | None, status: int, reason: str, sop_instance_uid: str | None
    ) -> None:
        # The receive could not even take the data set (full disk, no Affected SOP Instance UID): recorded like
        # every other refusal, so the job database says why.
        self.receiver.record_refusal(Peer(calling, host), status, reason, sop_instance_uid)

    # How associations end ------------------------------------------------------------------------------------------
    # A-RELEASE (PS3.8 7.2) is the only normal end; an A-ABORT from either side, a reset connection, a timeout or
    # the node stopping leave the studies it was sending interrupted (docs/receive.md, "Interrupted transfers").

    def _on_released(self, event: evt.Event) -> None:
        self._ended(event, None)

    def _on_aborted(self, event: evt.Event) -> None:
        calling = text_of(event.assoc.requestor.ae_title)
        peer = f"{calling} ({event.assoc.requestor.address})"
        if self._aborting:
            self._ended(event, f"the node stopped while an association from {peer} was delivering the study")
        else:
            self._ended(event, f"association from {peer} ended without A-RELEASE")

    def _ended(self, event: evt.Event, reason: str | None) -> None:
        self._let_go(event.assoc)
        try:
            studies = self.recorder.association_ended(_association_key(event), reason)
        except Exception:  # noqa: BLE001 - the next start-up marks the studies interrupted instead
            log.exception("cannot record the end of an association")
            return
        if studies and reason is not None:
            log.warning("%s; %d study(ies) wait for a resend", reason, len(studies))


def _association_key(event: evt.Event) -> str:
    """Names the association while it lasts (the recorder forgets it when the association ends)."""
    return f"assoc-{id(event.assoc):x}"
