"""The node killed mid-study, restarted, loses nothing and completes the study once; the disk watermark refuses."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import DICOM_DATA
from pydicom import dcmread
from receive_support import NodeProcess, echoscu, storescu, wait_for
from sqlalchemy import func, select

from dicom_node.db import AuditEvent, Database, Instance, Study, StudyState

pytestmark = pytest.mark.slow

SIEMENS = DICOM_DATA / "mr_brain_t1_siemens"


@pytest.fixture
def siemens() -> list[Path]:
    if not SIEMENS.is_dir():
        pytest.skip("shared DICOM data missing")
    return sorted(SIEMENS.iterdir())


def test_node_killed_mid_study_loses_nothing_and_completes_once(
    tmp_path: Path, sqlite_url: str, siemens: list[Path]
) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url, {"completion": {"quiet_seconds": 6.0}}).start()
    db = Database(sqlite_url, upgrade=False)
    study_uid = str(dcmread(siemens[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        sender = subprocess.Popen(
            ["/usr/bin/storescu", "-aet", "MRI", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), *map(str, siemens)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def some_received() -> int | None:
            with db.session() as session:
                count = session.execute(select(func.count(Instance.id))).scalar_one()
            return count if count >= 20 else None

        wait_for(some_received, timeout=60, interval=0.05)
        node.kill()  # SIGKILL in the middle of the association
        sender.wait(60)
        with db.session() as session:
            acknowledged = session.execute(select(func.count(Instance.id))).scalar_one()
            paths = [Path(p) for p in session.execute(select(Instance.file_path)).scalars()]
        assert 20 <= acknowledged < 176
        assert all(p.is_file() for p in paths)  # every recorded instance is on disk

        node.start()
        # The modality sends the study again: what arrived already is counted as duplicates, the rest is new.
        result = storescu(node.port, siemens, calling="MRI")
        assert result.returncode == 0, result.stderr

        def complete() -> Study | None:
            with db.session() as session:
                study = session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()
            return study if study.state == StudyState.COMPLETE else None

        study = wait_for(complete, timeout=30)
        assert study.instance_count == 176
        time.sleep(6.5)  # longer than the quiet time: nothing completes it a second time
        with db.session() as session:
            study = session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()
            duplicates = session.execute(select(func.sum(Instance.times_received - 1))).scalar_one()
        assert study.completion_count == 1
        assert duplicates >= acknowledged - 1
        assert len(list((node.data_dir / "spool" / study_uid).rglob("*.dcm"))) == 176
        assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
    finally:
        node.stop()
        db.dispose()


def test_disk_watermark_refuses_with_out_of_resources(tmp_path: Path, sqlite_url: str, siemens: list[Path]) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url, {"storage": {"min_free_bytes": 10**18}}).start()
    try:
        result = storescu(node.port, siemens[:1])
        assert result.returncode != 0  # DCMTK 3.6.7 exits with 167 = 0xA7, the status class
        assert node.alive() and echoscu(node.port).returncode == 0
        db = Database(sqlite_url, upgrade=False)
        with db.session() as session:
            assert session.execute(select(func.count(Instance.id))).scalar_one() == 0
            assert session.execute(select(func.count(AuditEvent.id))).scalar_one() >= 1
        db.dispose()
        assert "0xA700" in node.log()
    finally:
        node.stop()


def test_tls_associations(tmp_path: Path, sqlite_url: str) -> None:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    tls = {"enabled": True, "certificate": str(cert), "private_key": str(key)}
    node = NodeProcess(tmp_path / "node", sqlite_url, {"network": {"tls": tls}}).start()
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(context, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert echoscu(node.port).returncode != 0  # no TLS, no association
        assert node.alive()
    finally:
        node.stop()


def test_maximum_associations_refused_and_audited(tmp_path: Path, sqlite_url: str) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    # The readiness probe's bare TCP connections hold an association slot until the ACSE timeout.
    network = {"max_associations": 1, "acse_timeout": 1.0}
    node = NodeProcess(tmp_path / "node", sqlite_url, {"network": network}).start()
    time.sleep(1.5)
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert held.is_established
        refused = echoscu(node.port)
        assert refused.returncode != 0
        held.release()
        db = Database(sqlite_url, upgrade=False)

        def audited() -> bool:
            with db.session() as session:
                reasons = session.execute(
                    select(AuditEvent.reason).where(AuditEvent.event == "association_rejected")
                ).scalars()
                return any("local limit exceeded" in (r or "") for r in reasons)

        wait_for(audited, timeout=10)
        db.dispose()
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()
