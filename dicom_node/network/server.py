"""The association server behind the SCP: pynetdicom's threaded server with two failure modes closed.

* **TLS handshake off the accept path, bounded in time.** pynetdicom's ``AssociationServer.get_request`` wraps
  each accepted socket in TLS on the listener's only thread, without a timeout: one client that connects and sends
  nothing holds every other TLS client back until its socket closes. Here ``get_request`` only accepts; the
  handshake runs on the connection's own thread with ``network.tls_handshake_timeout``, and a connection that
  fails or times out is closed with a log line.
* **A C-STORE request the receive cannot take still gets a status.** pynetdicom's chunked receive
  (``_config.STORE_RECV_CHUNKED_DATASET``) writes the data set to a temporary file from the DUL reactor thread, in
  the middle of decoding the message. An exception there (a request without Affected SOP Instance UID, which the
  File Meta Information needs; ``ENOSPC`` on a full disk) stops the reactor: no response, the association hangs
  until a timeout, the temporary file stays. :class:`ReceiveGuard` catches it, removes the temporary file, drops
  the rest of that data set and answers the C-STORE with 0xA700 (out of resources) or 0xC210 (cannot understand)
  once its last fragment is in; the association carries on. Any other message that cannot be decoded aborts the
  association at once (pynetdicom's own answer to an invalid DIMSE message).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node.network.receiver import STATUS_PROCESSING_FAILURE
from dicom_node.storage.spool import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.events import EventHandlerType
    from pynetdicom.pdu_primitives import P_DATA
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)


_DATA_SET_LAST_FRAGMENT = 0b10  # message control header (PS3.8 E.2): bit 0 clear = data set, bit 1 set = last


# Told of every C-STORE the guard refuses: (calling AE title, peer host, status, reason, SOP Instance UID).
RefusalCallback = Callable[[str | None, str | None, int, str, str | None], None]


@dataclass
class _FailedStore:
    context_id: int
    command: Dataset
    status: int


def text_of(value: Any) -> str:
    """An AE title or UID as pynetdicom hands it over (bytes or str, padded), as plain text."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _ends_data_set(primitive: P_DATA) -> bool:
    return any(
        data and not data[0] & 1 and data[0] & _DATA_SET_LAST_FRAGMENT
        for _, data in primitive.presentation_data_value_list
    )


def _store_failure(error: Exception, command: Dataset) -> tuple[int, str]:
    """The C-STORE status and the reason for the log for an error while receiving a C-STORE request."""
    for keyword in ("AffectedSOPInstanceUID", "AffectedSOPClassUID"):
        if not text_of(command.get(keyword)):
            name = "Affected SOP Instance UID" if keyword == "AffectedSOPInstanceUID" else "Affected SOP Class UID"
            return STATUS_CANNOT_UNDERSTAND, f"the C-STORE request has no {name}"
    if isinstance(error, OSError):
        reason = f"cannot write the received data set: {error.strerror or error}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return STATUS_OUT_OF_RESOURCES, reason
        return STATUS_PROCESSING_FAILURE, reason
    return STATUS_CANNOT_UNDERSTAND, f"the C-STORE request cannot be decoded: {type(error).__name__}: {error}"


class ReceiveGuard:
    """Stands in for one association's ``DIMSEServiceProvider.receive_primitive`` (called by the DUL reactor with
    each P-DATA primitive) and turns an exception there into a C-STORE status or an A-ABORT."""

    def __init__(self, assoc: Association, on_refused: RefusalCallback | None = None) -> None:
        self.assoc = assoc
        self.dimse: DIMSEServiceProvider = assoc.dimse
        self._receive = assoc.dimse.receive_primitive
        self._failed: _FailedStore | None = None
        self._on_refused = on_refused

    @classmethod
    def install(cls, assoc: Association, on_refused: RefusalCallback | None = None) -> None:
        # An instance attribute over the method.
        setattr(assoc.dimse, "receive_primitive", cls(assoc, on_refused))  # noqa: B010

    def __call__(self, primitive: P_DATA) -> None:
        if self._failed is not None:  # the rest of a data set that is not kept
            if _ends_data_set(primitive):
                self._answer()
            return
        try:
            self._receive(primitive)
        except Exception as err:  # noqa: BLE001 - pynetdicom would stop the reactor and leave the peer waiting
            try:
                self._on_error(primitive, err)
            except Exception:  # noqa: BLE001 - whatever happens, the peer is not left waiting
                log.exception("cannot handle a receive error from %s, aborting the association", self._peer())
                self._abort()

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{text_of(requestor.ae_title) or '?'} ({requestor.address})"

    def _on_error(self, primitive: P_DATA, err: Exception) -> None:
        message, self.dimse.message = self.dimse.message, None
        if message is not None:
            self._discard(message)
        context_id = getattr(message, "context_id", None)
        if isinstance(message, C_STORE_RQ) and context_id is not None:
            command = message.command_set
            status, reason = _store_failure(err, command)
            sop_instance_uid = text_of(command.get("AffectedSOPInstanceUID")) or None
            peer, uid = self._peer(), sop_instance_uid
            log.warning("C-STORE from %s refused with 0x%04X: %s (SOP Instance %s)", peer, status, reason, uid)
            if self._on_refused is not None:
                requestor = self.assoc.requestor
                self._on_refused(
                    text_of(requestor.ae_title) or None, requestor.address, status, reason, sop_instance_uid
                )
            self._failed = _FailedStore(int(context_id), command, status)
            if _ends_data_set(primitive):
                self._answer()
            return
        log.error(
            "invalid DIMSE message from %s, aborting the association: %s: %s", self._peer(), type(err).__name__, err
        )
        self._abort()

    @staticmethod
    def _discard(message: Any) -> None:
        """Close and remove the temporary file of the chunked receive, if there is one."""
        temporary = getattr(message, "_data_set_file", None)
        path = getattr(message, "_data_set_path", None)
        if temporary is not None:
            with contextlib.suppress(OSError):  # close() flushes: fails again on a full disk, closes regardless
                temporary.close()
            path = path or getattr(temporary, "name", None)
        if isinstance(path, tuple):
            path = path[0]
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        message._data_set_file = None
        message._data_set_path = None

    def _answer(self) -> None:
        failed, self._failed = self._failed, None
        assert failed is not None
        command = failed.command
        try:
            message_id = command.get("MessageID")
            if message_id is None:
                raise ValueError("the request has no Message ID")
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = rsp.MessageID = int(message_id)
            rsp.AffectedSOPClassUID = text_of(command.get("AffectedSOPClassUID")) or None
            rsp.AffectedSOPInstanceUID = text_of(command.get("AffectedSOPInstanceUID")) or None
            rsp.Status = failed.status
            self.dimse.send_msg(rsp, failed.context_id)  # queued for the reactor, which is the calling thread
        except Exception as err:  # noqa: BLE001 - e.g. a malformed UID we cannot echo: abort instead
            log.error("cannot answer the C-STORE from %s, aborting the association: %s", self._peer(), err)
            self._abort()

    def _abort(self) -> None:
        # As pynetdicom does for a DIMSE message it cannot convert: Evt19 (invalid PDU) -> AA-8, A-ABORT to the peer.
        self.dimse.dul.event_queue.put("Evt19")


class GuardedRequestHandler(RequestHandler):
    server: AssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        ReceiveGuard.install(assoc, self.server.on_refused)
        return assoc


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake on the connection's thread and :class:`ReceiveGuard` on
    every association."""

    daemon_threads = True  # a stalled handshake does not hold up shutdown

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        handshake_timeout: float = 15.0,
        on_refused: RefusalCallback | None = None,
        listening: socket.socket | None = None,
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self.on_refused = on_refused
        self.listening = listening
        self._closing = False
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers, GuardedRequestHandler)

    def server_bind(self) -> None:
        """Bind as pynetdicom does, or adopt ``listening``: a socket the node's main process bound and listens on,
        shared by every receiving process (each accepts from it; the kernel hands each connection to one)."""
        if self.listening is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.listening
        # Non-blocking: when another process accepted the connection first, accept() returns EAGAIN (ignored by
        # socketserver) instead of blocking this process's accept loop.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only; pynetdicom would do the TLS handshake here, blocking the listener."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setblocking(True)  # as pynetdicom expects; the association sets its own timeouts
        return client, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        if self.ssl_context is not None and isinstance(request, socket.socket):
            wrapped = self._handshake(request, client_address)
            if wrapped is None:
                return
            request = wrapped
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: socket.socket, address: tuple[str, int] | str) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        sock.settimeout(self.handshake_timeout)
        try:
            wrapped = self.ssl_context.wrap_socket(sock, server_side=True)
        except TimeoutError:
            log.warning(
                "TLS handshake with %s not completed within %g s (network.tls_handshake_timeout); connection closed",
                peer,
                self.handshake_timeout,
            )
            self.shutdown_request(sock)
            return None
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            log.warning("TLS handshake with %s failed: %s; connection closed", peer, err)
            self.shutdown_request(sock)
            return None
        if self._closing:
            self.shutdown_request(wrapped)
            return None
        wrapped.settimeout(None)  # as accepted sockets are: the association has its own timeouts
        return wrapped

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[EventHandlerType],
    ssl_context: ssl.SSLContext | None,
    handshake_timeout: float,
    on_refused: RefusalCallback | None = None,
    listening: socket.socket | None = None,
) -> AssociationServer:
    """``ae.start_server(address, block=False, ...)`` with :class:`AssociationServer` (pynetdicom's non-blocking
    ``start_server`` always uses its own server class); on ``listening`` when given, else on ``address``."""
    server = ae.make_server(
        address if listening is None else listening.getsockname(),
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=AssociationServer,
        handshake_timeout=handshake_timeout,
        on_refused=on_refused,
        listening=listening,
    )
    assert isinstance(server, AssociationServer)
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True).start()
    ae._servers.append(server)
    return server
