"""The receive path end to end: ``dicom-node serve`` as a subprocess, DCMTK storescu/echoscu as the modality,
the job database on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DICOM_DATA, fresh_postgres_database
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from receive_support import DICOM_NODE, NodeProcess, echoscu, storescu, wait_for
from sqlalchemy import select

from dicom_node.db import AuditEvent, Database, Instance, Series, Study, StudyState

pytestmark = pytest.mark.slow

SIEMENS = DICOM_DATA / "mr_brain_t1_siemens"
CR = DICOM_DATA / "cr"
CHEST = CR / "pydicom-data_RG1_J2KI_CR_chest.dcm"
EXTREMITY = [CR / "pydicom-data_RG3_J2KI_CR_extremity.dcm", CR / "pydicom-data_RG3_J2KR_CR_extremity.dcm"]
ALLOWED = [{"ae_title": a} for a in ("MODALITY", "MRI", "ECHOSCU", "STORESCU", "PYNETDICOM", "SENDER1", "SENDER2")]

# pydicom's test files, one or more per compressed (or otherwise unusual) transfer syntax.
ENCODED_FILES = [
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'jobs.sqlite'}"
    else:
        yield from fresh_postgres_database("dn_receive")


@pytest.fixture(scope="module")
def node(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    if not SIEMENS.is_dir():
        pytest.skip("shared DICOM data missing")
    process = NodeProcess(
        tmp_path_factory.mktemp("node"), module_db_url, {"network": {"allowed_calling_aes": ALLOWED}}
    ).start()
    yield process
    assert process.stop() == 0, process.log()
    # Never a patient name or ID in the log (the Siemens volunteer's PatientName contains "Rorden").
    assert "Rorden" not in process.log()


@pytest.fixture(scope="module")
def db(node: NodeProcess) -> Iterator[Database]:
    database = Database(node.database_url, upgrade=False)
    yield database
    database.dispose()


def study_row(db: Database, study_uid: str) -> Study | None:
    with db.session() as session:
        return session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one_or_none()


def wait_complete(db: Database, study_uid: str, count: int = 1, timeout: float = 30) -> Study:
    def probe() -> Study | None:
        study = study_row(db, study_uid)
        if study and study.state == StudyState.COMPLETE and study.completion_count >= count:
            return study
        return None

    return wait_for(probe, timeout)


def series_rows(db: Database, study_id: int) -> list[Series]:
    with db.session() as session:
        return list(session.execute(select(Series).where(Series.study_id == study_id)).scalars())


def instance_row(db: Database, sop_uid: str) -> Instance | None:
    with db.session() as session:
        return session.execute(select(Instance).where(Instance.sop_instance_uid == sop_uid)).scalar_one_or_none()


def test_echo(node: NodeProcess) -> None:
    assert echoscu(node.port).returncode == 0


def test_siemens_t1_is_one_complete_study_routed_to_brain_mri(node: NodeProcess, db: Database) -> None:
    files = sorted(SIEMENS.iterdir())
    result = storescu(node.port, files, calling="MRI")
    assert result.returncode == 0, result.stderr
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    study = wait_complete(db, study_uid)
    assert study.instance_count == 176
    assert study.completion_count == 1
    assert study.completion_reason == "quiet for 2 s"
    assert study.calling_ae_title == "MRI"
    [series] = series_rows(db, study.id)
    assert (series.instance_count, series.detector, series.routing_rule) == (176, "brain_mri", "brain-mr")
    assert series.routed_at is not None
    # Stored exactly as sent, under <spool>/<study>/<series>/<SOP Instance UID>.dcm.
    first = dcmread(files[0], stop_before_pixels=True)
    stored = node.data_dir / "spool" / study_uid / first.SeriesInstanceUID / f"{first.SOPInstanceUID}.dcm"
    assert stored.read_bytes()[132:][-1000:] == files[0].read_bytes()[-1000:]
    assert len(list(stored.parent.glob("*.dcm"))) == 176

    shown = subprocess.run(
        [str(DICOM_NODE), "studies", "show", study_uid, "--json", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["instances"] == 176
    assert report["completion_reason"] == "quiet for 2 s"
    assert report["series"][0]["detector"] == "brain_mri"
    table = subprocess.run(
        [str(DICOM_NODE), "studies", "show", study_uid, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "brain_mri" in table.stdout and "t1_MPRAGEcr_noGRAPPA" in table.stdout


def test_cr_chest_routed_to_chest_xray_and_extremity_ignored(node: NodeProcess, db: Database) -> None:
    assert storescu(node.port, [CHEST]).returncode == 0
    assert storescu(node.port, [EXTREMITY[0]]).returncode == 0
    assert storescu(node.port, [EXTREMITY[1]]).returncode == 0
    chest = dcmread(CHEST, stop_before_pixels=True)
    study = wait_complete(db, chest.StudyInstanceUID)
    [series] = series_rows(db, study.id)
    assert series.detector == "chest_xray"
    extremity = dcmread(EXTREMITY[0], stop_before_pixels=True)
    study = wait_complete(db, extremity.StudyInstanceUID)
    [series] = series_rows(db, study.id)
    assert series.detector is None
    assert series.routing_reason == "not a chest study"
    assert series.instance_count == 2


def _with_new_uids(source: Path, target_dir: Path, study_uid: str) -> Path:
    ds = dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target = target_dir / source.name
    ds.save_as(target, enforce_file_format=True)
    return target


def test_encoded_transfer_syntaxes_are_stored_as_received(node: NodeProcess, db: Database, tmp_path: Path) -> None:
    study_uid = generate_uid()
    for name in ENCODED_FILES:
        sent = _with_new_uids(Path(str(get_testdata_file(name))), tmp_path, study_uid)
        result = storescu(node.port, [sent])
        assert result.returncode == 0, f"{name}: {result.stderr}"
        source = dcmread(sent)
        row = instance_row(db, source.SOPInstanceUID)
        assert row is not None, name
        assert row.transfer_syntax_uid == source.file_meta.TransferSyntaxUID, name
        stored = dcmread(row.file_path)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, name
        assert stored.PixelData == source.PixelData, name


def test_calling_ae_not_on_the_allow_list_is_refused_and_audited(node: NodeProcess, db: Database) -> None:
    refused = echoscu(node.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wrong_called = echoscu(node.port, called="SOMEONE")
    assert wrong_called.returncode != 0

    def rejections() -> set[tuple[str | None, str | None]] | None:
        # The audit row is committed by the association's thread, maybe just after the peer saw the rejection.
        with db.session() as session:
            events = session.execute(select(AuditEvent).where(AuditEvent.event == "association_rejected")).scalars()
            reasons = {(e.calling_ae_title, e.reason) for e in events}
        found = any(ae == "INTRUDER" and "allow-list" in (r or "") for ae, r in reasons) and any(
            "called AE title 'SOMEONE'" in (r or "") for _, r in reasons
        )
        return reasons if found else None

    try:
        wait_for(rejections, timeout=15)
    except AssertionError as err:
        raise AssertionError(f"{err}: {rejections()}\n{node.log()[-3000:]}") from None
    assert echoscu(node.port, calling="ECHOSCU").returncode == 0

    def accepted() -> bool:
        with db.session() as session:
            events = session.execute(select(AuditEvent).where(AuditEvent.event == "association_accepted")).scalars()
            return any(e.calling_ae_title == "ECHOSCU" for e in events)

    try:
        wait_for(accepted, timeout=15)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{node.log()[-3000:]}") from None


def _send_raw(port: int, path: Path) -> int:
    """Send a file's bytes as they are (pynetdicom's chunked send): DCMTK refuses to send broken files."""
    ae = AE(ae_title="PYNETDICOM")
    meta = dcmread(path, stop_before_pixels=True)
    ae.add_requested_context(meta.file_meta.MediaStorageSOPClassUID, meta.file_meta.TransferSyntaxUID)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(status.Status)


def test_truncated_and_garbage_data_sets_get_an_error_status_and_the_node_stays_up(
    node: NodeProcess, tmp_path: Path
) -> None:
    truncated = Path(str(get_testdata_file("MR_truncated.dcm")))
    assert storescu(node.port, [truncated]).returncode != 0  # DCMTK will not even send it
    assert _send_raw(node.port, truncated) == 0xC210
    # Valid File Meta Information followed by random bytes.
    garbage = tmp_path / "garbage.dcm"
    head = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    ds = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    garbage.write_bytes(head[:meta_end] + bytes(range(256)) * 40)
    assert _send_raw(node.port, garbage) & 0xF000 == 0xC000
    # Header without SOP Instance UID: the chest file with its SOP Instance UID removed.
    missing = tmp_path / "no_sop_instance.dcm"
    ds = dcmread(CHEST)
    del ds.SOPInstanceUID
    ds.save_as(missing)
    assert _send_raw(node.port, missing) & 0xF000 == 0xC000
    assert node.alive()
    assert echoscu(node.port).returncode == 0


def test_duplicates_are_stored_once_and_counted(node: NodeProcess, db: Database, tmp_path: Path) -> None:
    sent = _with_new_uids(Path(str(get_testdata_file("CT_small.dcm"))), tmp_path, generate_uid())
    assert storescu(node.port, [sent]).returncode == 0
    assert storescu(node.port, [sent, sent]).returncode == 0
    uid = str(dcmread(sent, stop_before_pixels=True).SOPInstanceUID)
    row = instance_row(db, uid)
    assert row is not None and row.times_received == 3 and row.last_duplicate_at is not None
    assert len(list(Path(row.file_path).parent.glob("*.dcm"))) == 1


def test_late_instance_reopens_and_recompletes_the_study(node: NodeProcess, db: Database, tmp_path: Path) -> None:
    study_uid = generate_uid()
    first = _with_new_uids(Path(str(get_testdata_file("CT_small.dcm"))), tmp_path, study_uid)
    assert storescu(node.port, [first]).returncode == 0
    study = wait_complete(db, study_uid)
    assert not study.needs_reprocessing
    late = tmp_path / "late"
    late.mkdir()
    second = _with_new_uids(Path(str(get_testdata_file("CT_small.dcm"))), late, study_uid)
    assert storescu(node.port, [second]).returncode == 0
    row = instance_row(db, str(dcmread(second, stop_before_pixels=True).SOPInstanceUID))
    assert row is not None and row.after_completion
    study = wait_complete(db, study_uid, count=2)
    assert study.needs_reprocessing
    assert study.instance_count == 2
    assert (study.completion_reason or "").startswith("re-completed after late instances")


def test_concurrent_associations_deliver_one_study(node: NodeProcess, db: Database, tmp_path: Path) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    files = []
    for i, source in enumerate(sorted(SIEMENS.iterdir())[:40]):
        ds = dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"{i:03d}.dcm")
        ds.save_as(files[-1])
    results: list[int] = []
    senders = [
        threading.Thread(
            target=lambda n=n: results.append(storescu(node.port, files[n::2], f"SENDER{n + 1}").returncode)
        )
        for n in range(2)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert results == [0, 0]
    study = wait_complete(db, study_uid)
    assert study.instance_count == 40 and study.completion_count == 1
    [series] = series_rows(db, study.id)
    assert series.instance_count == 40
