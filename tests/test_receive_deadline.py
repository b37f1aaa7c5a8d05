"""A job database locked longer than the sender waits: the sender still gets an answer, 0xC211 (retry later),
before ``storage.record_deadline_seconds``, and the same instance sent again once the lock is gone is stored once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from conftest import DICOM_DATA
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from receive_support import AE_TITLE, NodeProcess
from sqlalchemy import func, select

from dicom_node.db import Database, Instance

pytestmark = pytest.mark.slow

SLICE = DICOM_DATA / "mr_brain_t1_siemens" / "00001.dcm"


def test_locked_database_answers_c211_before_the_deadline(tmp_path: Path) -> None:
    if not SLICE.is_file():
        pytest.skip("shared DICOM data missing")
    database = tmp_path / "jobs.sqlite"
    url = f"sqlite:///{database}"
    node = NodeProcess(tmp_path / "node", url, {"storage": {"min_free_bytes": 0, "record_deadline_seconds": 2.0}})
    node.start()
    ae = AE(ae_title="MRI")
    ae.dimse_timeout = 15  # the sender's patience: longer than the deadline, shorter than the lock
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    lock = sqlite3.connect(database, timeout=5, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock for longer than anyone waits
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        started = time.monotonic()
        status = assoc.send_c_store(SLICE)
        waited = time.monotonic() - started
        assert status and int(status.Status) == 0xC211
        assert 1.5 <= waited < 10
        lock.execute("ROLLBACK")
        assert int(assoc.send_c_store(SLICE).Status) == 0  # the resend is stored (once)
        assoc.release()
        assert node.alive()
        db = Database(url, upgrade=False)
        with db.session() as session:
            assert session.scalar(select(func.count(Instance.id))) == 1
        db.dispose()
        assert "recording SOP Instance" in node.log()
    finally:
        lock.close()
        node.stop()
