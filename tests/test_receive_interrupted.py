"""An association that ends without A-RELEASE (A-ABORT, node killed) leaves its study waiting for a resend: the
quiet timer alone does not complete it, so the resend gives one job and one result set in the PACS."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import DICOM_DATA
from orthanc_server import Orthanc, running_orthanc
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from receive_support import AE_TITLE, DICOM_NODE, NodeProcess, storescu, wait_for
from sqlalchemy import func, select

from dicom_node.db import Database, Instance, Job, JobState, Study, StudyState

pytestmark = pytest.mark.slow

SIEMENS = DICOM_DATA / "mr_brain_t1_siemens"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def siemens() -> list[Path]:
    if not SIEMENS.is_dir():
        pytest.skip("shared DICOM data missing")
    return sorted(SIEMENS.glob("*.dcm"))


def _study(db: Database, study_uid: str) -> Study | None:
    with db.session() as session:
        return session.scalar(select(Study).where(Study.study_instance_uid == study_uid))


def _send_then_abort(port: int, files: list[Path]) -> None:
    ae = AE(ae_title="MRI")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    for path in files:
        assert int(assoc.send_c_store(path).Status) == 0
    assoc.abort()


def test_aborted_study_waits_for_the_resend_and_completes_once(
    tmp_path: Path, sqlite_url: str, siemens: list[Path]
) -> None:
    settings = {"completion": {"quiet_seconds": 1.0, "interrupted_grace_seconds": 600}}
    node = NodeProcess(tmp_path / "node", sqlite_url, settings).start()
    db = Database(sqlite_url, upgrade=False)
    study_uid = str(pydicom.dcmread(siemens[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        _send_then_abort(node.port, siemens[:10])
        study = wait_for(lambda: (s := _study(db, study_uid)) and s.interrupted_at and s, timeout=10)
        assert "without A-RELEASE" in (study.interruption_reason or "")
        shown = subprocess.run(
            [str(DICOM_NODE), "studies", "show", study_uid, "--config", str(node.config_path), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(shown.stdout)["interruption_reason"] == study.interruption_reason  # what an admin sees
        time.sleep(3)  # three times the quiet time: an uninterrupted study would be complete by now
        study = _study(db, study_uid)
        assert study is not None and study.state == StudyState.RECEIVING

        sent = storescu(node.port, siemens[:20], calling="MRI")  # the modality sends the study again
        assert sent.returncode == 0, sent.stderr
        study = wait_for(lambda: (s := _study(db, study_uid)) and s.state == StudyState.COMPLETE and s, timeout=20)
        assert study.completion_count == 1 and study.instance_count == 20
        assert study.interrupted_at is None and study.open_associations == 0
        assert study.completion_reason == "quiet for 1 s"

        def jobs() -> int:
            with db.session() as session:
                return int(session.scalar(select(func.count(Job.id))) or 0)

        wait_for(jobs, timeout=20)  # the scheduler runs just after the completion is committed
        time.sleep(2)
        assert jobs() == 1
    finally:
        node.stop()
        db.dispose()


def test_aborted_study_without_a_resend_completes_after_the_grace(
    tmp_path: Path, sqlite_url: str, siemens: list[Path]
) -> None:
    settings = {"completion": {"quiet_seconds": 1.0, "interrupted_grace_seconds": 4.0}}
    node = NodeProcess(tmp_path / "node", sqlite_url, settings).start()
    db = Database(sqlite_url, upgrade=False)
    study_uid = str(pydicom.dcmread(siemens[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        started = time.monotonic()
        _send_then_abort(node.port, siemens[:5])
        study = wait_for(lambda: (s := _study(db, study_uid)) and s.state == StudyState.COMPLETE and s, timeout=20)
        assert time.monotonic() - started >= 4.0
        assert study.completion_reason is not None
        assert study.completion_reason.startswith("quiet for 4 s after an interrupted transfer (association from MRI")
    finally:
        node.stop()
        db.dispose()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(tmp_path / "orthanc")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_node_killed_mid_association_leaves_no_orphan_workers_and_one_result_set(
    tmp_path: Path, sqlite_url: str, orthanc: Orthanc, siemens: list[Path]
) -> None:
    node = NodeProcess(
        tmp_path / "node",
        sqlite_url,
        {
            "completion": {"quiet_seconds": 2.0, "interrupted_grace_seconds": 600},
            "workers": {"embedded": True, "sweep_interval_seconds": 1.0, "device": "cpu"},
            "destinations": [
                {
                    "name": "orthanc",
                    "ae_title": orthanc.ae_title,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "profile": {"objects": ["SEG", "SR"]},
                    "backoff_initial_seconds": 1.0,
                }
            ],
        },
    ).start()
    worker_marker = str(node.data_dir / "run" / "worker-settings.json")
    db = Database(sqlite_url, upgrade=False)
    study_uid = str(pydicom.dcmread(siemens[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        assert wait_for(lambda: _processes_mentioning(worker_marker), timeout=30)
        sender = subprocess.Popen(
            ["/usr/bin/storescu", "-aet", "MRI", "-aec", AE_TITLE, "127.0.0.1", str(node.port), *map(str, siemens)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def some_received() -> int | None:
            with db.session() as session:
                count = session.scalar(select(func.count(Instance.id))) or 0
            return count if count >= 40 else None

        wait_for(some_received, timeout=60, interval=0.05)
        node.kill()  # SIGKILL in the middle of the association
        sender.wait(60)
        # The embedded workers go with the node instead of living on beside the next one.
        wait_for(lambda: not _processes_mentioning(worker_marker), timeout=60)
        with db.session() as session:
            partial = session.scalar(select(func.count(Instance.id)))
        assert partial is not None and partial < len(siemens)

        node.start()
        study = wait_for(lambda: (s := _study(db, study_uid)) and s.interrupted_at and s, timeout=20)
        assert "node stopped" in (study.interruption_reason or "")
        time.sleep(4)  # twice the quiet time: the partial study is not completed on its own
        assert (s := _study(db, study_uid)) is not None and s.state == StudyState.RECEIVING
        with db.session() as session:
            assert session.scalar(select(func.count(Job.id))) == 0

        sent = storescu(node.port, siemens, calling="MRI")
        assert sent.returncode == 0, sent.stderr

        def delivered() -> Job | None:
            with db.session() as session:
                job = session.scalar(select(Job).where(Job.state == JobState.DELIVERED))
            return job

        wait_for(delivered, timeout=300, interval=1.0)
        time.sleep(3)  # nothing else follows
        with db.session() as session:
            jobs = session.scalars(select(Job)).all()
        assert len(jobs) == 1, [(j.id, j.state) for j in jobs]
        in_pacs = [orthanc.tags(i) for i in orthanc.instances()]
        reports = [t for t in in_pacs if t.get("SOPClassUID") == COMPREHENSIVE_3D_SR]
        assert len(reports) == 1
        assert os.path.exists(worker_marker)
    finally:
        node.stop()
        db.dispose()
