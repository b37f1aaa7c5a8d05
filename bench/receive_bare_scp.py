"""A bare pynetdicom Storage SCP for bench/receive_load.py: chunked receive to a temporary file, deleted at once,
always Success. What pynetdicom alone can take, to tell its limits from the node's own receive path.

    .venv/bin/python -m bench.receive_bare_scp PORT [PROCESSES]

With PROCESSES > 1, that many processes listen on the port (SO_REUSEPORT; the kernel spreads the connections).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.transport import ThreadedAssociationServer


class ReusePortServer(ThreadedAssociationServer):
    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def serve(port: int) -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = tempfile.mkdtemp(prefix="bare-scp-")

    def on_store(event: evt.Event) -> int:
        os.unlink(event.dataset_path)
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian])
    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],  # type: ignore[list-item]
        server_class=ReusePortServer,
    )
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = argv or sys.argv[1:]
    port, processes = int(args[0]), int(args[1]) if len(args) > 1 else 1
    children = [multiprocessing.get_context("fork").Process(target=serve, args=(port,)) for _ in range(processes - 1)]
    for child in children:
        child.daemon = True
        child.start()
    serve(port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
