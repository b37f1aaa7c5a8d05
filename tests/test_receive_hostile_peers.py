"""Peers that misbehave, and a disk that fills up, must not cost the sender a status or anyone else the node
(issue 20): a C-STORE request without Affected SOP Instance UID, an idle TCP connection on the TLS port, a full
file system under the spool. Real sockets, ``dicom-node serve`` as a subprocess, pynetdicom as the peer."""

from __future__ import annotations

import errno
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from receive_support import AE_TITLE, NodeProcess, echoscu, wait_for
from sqlalchemy import select

from dicom_node.db import AuditEvent, Database

pytestmark = pytest.mark.slow

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def _instance() -> Dataset:
    """CT_small with fresh UIDs (about 39 KB)."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _peer(dimse_timeout: float = 20.0) -> AE:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.connection_timeout = 10
    ae.dimse_timeout = dimse_timeout
    ae.add_requested_context(CT_SMALL_SOP_CLASS, CT_SMALL_TS)
    ae.add_requested_context(Verification)
    return ae


_meta = dcmread(CT_SMALL, stop_before_pixels=True)
CT_SMALL_SOP_CLASS, CT_SMALL_TS = str(_meta.SOPClassUID), str(_meta.file_meta.TransferSyntaxUID)


def _store(port: int, ds: Dataset, tls_args: Any = None, strip_affected_instance: bool = False) -> tuple[int, float]:
    """Send one instance on a new association; (status, seconds); status -1 when no response came."""
    ae = _peer()
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=tls_args)
    assert assoc.is_established
    if strip_affected_instance:
        send = assoc.dimse.send_msg

        def without_affected_instance(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
                primitive.AffectedSOPInstanceUID = None  # the element is then left out of the command set
            send(primitive, context_id)

        assoc.dimse.send_msg = without_affected_instance  # type: ignore[method-assign]
    started = time.monotonic()
    status = assoc.send_c_store(ds)
    elapsed = time.monotonic() - started
    if assoc.is_established:
        assoc.release()
    return (int(status.Status) if "Status" in status else -1), elapsed


def _incoming(node: NodeProcess) -> list[Path]:
    return list((node.data_dir / "spool" / ".incoming").iterdir())


# 3. C-STORE request without Affected SOP Instance UID -----------------------------------------------------------


def test_c_store_without_affected_sop_instance_uid_is_refused_at_once(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url).start()
    try:
        status, elapsed = _store(node.port, _instance(), strip_affected_instance=True)
        assert status == 0xC210, node.log()[-3000:]
        assert elapsed < 5
        assert "no Affected SOP Instance UID" in node.log()
        assert _incoming(node) == []
        assert node.alive()
        db = Database(sqlite_url, upgrade=False)
        with db.session() as session:  # the job database says why
            reasons = session.scalars(select(AuditEvent.reason).where(AuditEvent.event == "instance_refused")).all()
        db.dispose()
        assert len(reasons) == 1 and reasons[0].startswith("0xC210: the C-STORE request has no Affected SOP Instance")
        # A good instance on a new association afterwards is stored.
        status, _ = _store(node.port, _instance())
        assert status == 0x0000, node.log()[-3000:]
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()


def test_a_later_good_c_store_on_the_same_association_succeeds(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url).start()
    try:
        ae = _peer()
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established
        send = assoc.dimse.send_msg
        strip = [True]

        def without_affected_instance(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None and strip[0]:
                primitive.AffectedSOPInstanceUID = None
            send(primitive, context_id)

        assoc.dimse.send_msg = without_affected_instance  # type: ignore[method-assign]
        assert assoc.send_c_store(_instance()).Status == 0xC210
        strip[0] = False
        assert assoc.send_c_store(_instance()).Status == 0x0000
        assoc.release()
        assert _incoming(node) == []
    finally:
        node.stop()


def test_undecodable_dimse_message_aborts_the_association_at_once(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url).start()
    try:
        ae = _peer()
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established
        command = Dataset()
        command.AffectedSOPClassUID = Verification
        command.CommandField = 0x7777  # no such DIMSE command
        command.MessageID = 1
        command.CommandDataSetType = 0x0101
        encoded = encode(command, True, True)
        assert encoded is not None
        command.CommandGroupLength = len(encoded)
        pdata = P_DATA()
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == Verification)
        pdata.presentation_data_value_list = [[context_id, b"\x03" + encode(command, True, True)]]
        assoc.dul.send_pdu(pdata)
        wait_for(lambda: assoc.is_aborted, timeout=5)
        assert "invalid DIMSE message" in node.log()
        assert node.alive()
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()


# 4. An idle TCP connection must not freeze TLS ----------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, both signed by the CA."""
    d = tmp_path / "pki"
    d.mkdir()
    ca, ca_key = str(d / "ca.crt"), str(d / "ca.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA", "-keyout", ca_key,
             "-out", ca)  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, crt, ext = (str(d / f"{name}.{suffix}") for suffix in ("key", "csr", "crt", "ext"))
        Path(ext).write_text(extension + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                 "-extfile", ext, "-out", crt)  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture
def tls_node(tmp_path: Path, sqlite_url: str, pki: dict[str, Path]) -> Iterator[NodeProcess]:
    tls = {
        "enabled": True,
        "certificate": str(pki["server_crt"]),
        "private_key": str(pki["server_key"]),
        "ca_certificates": str(pki["ca_crt"]),
        "require_client_certificate": True,
    }
    node = NodeProcess(tmp_path / "node", sqlite_url, {"network": {"tls": tls, "tls_handshake_timeout": 3.0}})
    node.start()
    time.sleep(0.5)  # the readiness probe's bare connection is gone before the test's
    yield node
    node.stop()


def _client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
    context.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    return context


def test_idle_tcp_connection_does_not_block_other_tls_associations(tls_node: NodeProcess, pki: dict[str, Path]) -> None:
    idle = socket.create_connection(("127.0.0.1", tls_node.port))  # connects, never says a word
    try:
        time.sleep(0.5)
        started = time.monotonic()
        ae = _peer()
        assoc = ae.associate(
            "127.0.0.1", tls_node.port, ae_title=AE_TITLE, tls_args=(_client_context(pki), "localhost")
        )
        assert assoc.is_established, tls_node.log()[-3000:]
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(_instance()).Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 2.5  # well before the idle connection's handshake times out

        # The idle connection is closed once the handshake timeout (3 s here) has passed, with a log line.
        idle.settimeout(10)
        assert idle.recv(1) == b""
        assert wait_for(lambda: "TLS handshake" in tls_node.log(), timeout=5)
    finally:
        idle.close()
    assert tls_node.alive()


def test_tls_handshake_failure_is_logged_and_others_unaffected(tls_node: NodeProcess, pki: dict[str, Path]) -> None:
    # A client without a certificate: the node requires one.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
    ae = _peer()
    assoc = ae.associate("127.0.0.1", tls_node.port, ae_title=AE_TITLE, tls_args=(context, "localhost"))
    assert not assoc.is_established
    ae = _peer()
    assoc = ae.associate("127.0.0.1", tls_node.port, ae_title=AE_TITLE, tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert wait_for(lambda: "TLS handshake" in tls_node.log(), timeout=5)
    assert tls_node.alive()


# 6. A truly full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted where the node keeps its spool (``<data_dir>/spool``); the log and the job database
    stay outside, on the ordinary file system."""
    spool = tmp_path / "node" / "spool"
    spool.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("cannot mount a small tmpfs: no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; its path."""
    filler = directory / "filler.bin"
    with filler.open("wb", buffering=0) as fp:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    fp.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    return filler


def test_full_disk_answers_out_of_resources_and_recovers(small_spool: Path, sqlite_url: str) -> None:
    node = NodeProcess(small_spool.parent, sqlite_url, {"storage": {"min_free_bytes": 0}}).start()
    try:
        filler = _fill(small_spool)
        status, elapsed = _store(node.port, _instance())
        assert status == 0xA700, node.log()[-3000:]
        assert elapsed < 5
        assert _incoming(node) == []
        assert "No space left on device" in node.log()
        assert node.alive()
        assert echoscu(node.port).returncode == 0

        filler.unlink()  # space is back
        ds = _instance()
        status, _ = _store(node.port, ds)
        assert status == 0x0000, node.log()[-3000:]
        stored = small_spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
        assert _incoming(node) == []
    finally:
        node.stop()
