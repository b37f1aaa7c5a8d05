"""A bare pynetdicom Storage SCP for bench/receive_load.py: chunked receive to a temporary file, deleted at once,
always Success. What pynetdicom alone can take, to tell its limits from the node's own receive path.

    .venv/bin/python -m bench.receive_bare_scp PORT
"""

from __future__ import annotations

import os
import sys
import tempfile

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt


def main(argv: list[str] | None = None) -> int:
    port = int((argv or sys.argv[1:])[0])
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
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])  # type: ignore[list-item]
    return 0


if __name__ == "__main__":
    sys.exit(main())
