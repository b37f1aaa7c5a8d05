"""Delivery against real peers: Orthanc (the PACS), a pynetdicom SCP that refuses, an HTTP server for webhooks."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port
from orthanc_server import DICOMWEB_PLUGIN, Orthanc, running_orthanc
from pynetdicom import AE, evt
from result_data import CR_CHEST, brain_files, create_job, synthetic_result
from sqlalchemy import func, select

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database
from dicom_node.db.models import DeliveryAttempt, Job, JobEvent, JobState, ResultObject
from dicom_node.delivery import handover
from dicom_node.delivery.pipeline import deliver_job, warm_up
from dicom_node.delivery.scu import classify_status
from dicom_node.models.base import SeriesResult

STORESCU = Path("/usr/bin/storescu")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(tmp_path / "orthanc")


def make_settings(
    tmp_path: Path, destinations: list[dict[str, Any]], webhooks: list[dict[str, Any]] | None = None
) -> Settings:
    return load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path / "node"), "ae_title": "DICOMNODE"},
            "network": {"acse_timeout": 5, "dimse_timeout": 30, "network_timeout": 30},
            "destinations": destinations,
            "webhooks": webhooks or [],
        }
    )


def orthanc_destination(server: Orthanc, objects: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "pacs",
        "ae_title": server.ae_title,
        "host": "127.0.0.1",
        "port": server.dicom_port,
        "profile": {"objects": objects, **extra.pop("profile", {})},
        **extra,
    }


def send_with_storescu(server: Orthanc, files: list[Path], *options: str) -> None:
    """Send the source images as a modality would (DCMTK storescu), so results can join their study."""
    subprocess.run(
        [
            str(STORESCU),
            *options,
            "-aet",
            "MODALITY",
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dicom_port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def count(db: Database, model: type, job_id: int) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(model.job_id == job_id)) or 0)


def job_row(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def test_status_classification() -> None:
    assert classify_status(0x0000) == "stored"
    assert {classify_status(s) for s in (0xB000, 0xB006, 0xB007)} == {"warning"}
    assert {classify_status(s) for s in (0xA700, 0xA7FF)} == {"retry"}
    assert {classify_status(s) for s in (0xA900, 0xC000, 0xC123, 0x0122)} == {"failed"}


@pytest.mark.slow
def test_brain_results_join_the_source_study_in_orthanc(orthanc: Orthanc, sqlite_url: str, tmp_path: Path) -> None:
    files = brain_files()
    send_with_storescu(orthanc, files)
    settings = make_settings(tmp_path, [orthanc_destination(orthanc, ["SEG", "SR", "PM", "SC"])])
    db = Database(sqlite_url)
    result = synthetic_result(files, "brain_mri")
    job_id = create_job(db, files, result, settings.results_dir, detector="brain_mri")

    report = deliver_job(db, settings, job_id)

    assert report.state == JobState.DELIVERED, report
    assert report.stored == ["pacs"]
    assert report.seconds_complete_to_stored is not None and report.seconds_complete_to_stored >= 5.0
    studies = orthanc.get("/studies")
    assert len(studies) == 1, "results must join the source study, not open a new one"
    assert len(orthanc.instances()) == len(files) + 4
    seg = orthanc.instances_of_series_number(9901)
    assert len(seg) == 1 and seg[0]["SOPClassUID"] == SEG_STORAGE
    source = orthanc.instances_of_series_number(int(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesNumber))[0]
    for number in (9901, 9902, 9903, 9904):
        (tags,) = orthanc.instances_of_series_number(number)
        assert tags["StudyInstanceUID"] == source["StudyInstanceUID"]
        assert tags["PatientID"] == source["PatientID"]
    assert seg[0]["FrameOfReferenceUID"] == source["FrameOfReferenceUID"]
    referenced = {
        frame["DerivationImageSequence"][0]["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        for frame in seg[0]["PerFrameFunctionalGroupsSequence"]
    }
    assert referenced == set(result.sop_instance_uids)
    with db.session() as session:
        kinds = sorted(session.scalars(select(ResultObject.kind).where(ResultObject.job_id == job_id)))
        events = [e.event for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert kinds == ["PM", "SC", "SEG", "SR"]
    assert events[-1] == "delivered"
    assert (settings.results_dir / f"job-{job_id}" / "dicom" / "SR.dcm").exists()

    # Idempotent: a second call sends nothing; a forced re-delivery re-sends the same UIDs (no duplicates).
    again = deliver_job(db, settings, job_id)
    assert again.stored == ["pacs"] and count(db, DeliveryAttempt, job_id) == 1
    forced = deliver_job(db, settings, job_id, force=True)
    assert forced.state == JobState.DELIVERED
    assert count(db, DeliveryAttempt, job_id) == 2 and count(db, ResultObject, job_id) == 4
    assert len(orthanc.instances()) == len(files) + 4
    db.dispose()


def test_chest_results_join_the_source_study(orthanc: Orthanc, database: Database, tmp_path: Path) -> None:
    send_with_storescu(orthanc, [CR_CHEST], "-xw")  # propose JPEG 2000 as stored
    settings = make_settings(tmp_path, [orthanc_destination(orthanc, ["SEG", "SR", "SC"])])
    job_id = create_job(
        database, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
    )

    report = deliver_job(database, settings, job_id)

    assert report.state == JobState.DELIVERED, report
    assert len(orthanc.get("/studies")) == 1
    assert len(orthanc.instances()) == 4
    (seg,) = orthanc.instances_of_series_number(9901)
    (sr,) = orthanc.instances_of_series_number(9902)
    assert sr["SOPClassUID"] == COMPREHENSIVE_3D_SR and sr["VerificationFlag"] == "UNVERIFIED"
    frame = seg["PerFrameFunctionalGroupsSequence"][0]
    source_uid = frame["DerivationImageSequence"][0]["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
    assert source_uid == "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457"
    assert job_row(database, job_id).delivered_at is not None


def test_orthanc_down_then_back_delivers_exactly_once(tmp_path: Path, database: Database) -> None:
    server = Orthanc(tmp_path / "orthanc")
    server.directory.mkdir()
    settings = make_settings(
        tmp_path, [orthanc_destination(server, ["SEG", "SR"], backoff_initial_seconds=1.0, max_attempts=5)]
    )
    job_id = create_job(
        database, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
    )

    server.start()  # the PACS was up, then goes down
    server.stop()
    first = deliver_job(database, settings, job_id)
    assert first.state == JobState.SUCCEEDED and first.retry == {"pacs": 1.0}
    second = deliver_job(database, settings, job_id)
    assert second.retry == {"pacs": 2.0}, "exponential backoff"
    job = job_row(database, job_id)
    assert job.next_attempt_at is not None and job.state == JobState.SUCCEEDED

    server.start()  # back, with its storage
    try:
        third = deliver_job(database, settings, job_id)
        assert third.state == JobState.DELIVERED and third.retry == {}
        deliver_job(database, settings, job_id)  # a late duplicate task changes nothing
        assert len(server.instances()) == 2
    finally:
        server.stop()
    with database.session() as session:
        outcomes = [a.outcome for a in session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job_id))]
    assert outcomes == ["retry", "retry", "stored"]
    assert count(database, ResultObject, job_id) == 2


class RefusingScp:
    """A real DICOM peer that answers every C-STORE with one status."""

    def __init__(
        self, status: int, transfer_syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    ) -> None:
        self.status = status
        self.port = free_port()
        self.received = 0
        self.transfer_syntaxes: list[str] = []
        self.datasets: list[pydicom.Dataset] = []
        ae = AE(ae_title="REFUSER")
        for sop_class in (SEG_STORAGE, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, STORAGE_COMMITMENT, PARAMETRIC_MAP):
            ae.add_supported_context(sop_class, list(transfer_syntaxes))
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
        )

    def _on_store(self, event: evt.Event) -> int:
        self.received += 1
        self.transfer_syntaxes.append(str(event.context.transfer_syntax))
        self.datasets.append(event.dataset)
        return self.status

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        return 0x0000, None  # accepts the commitment request and never reports

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("status", [0xC000, 0xA900])
def test_refusal_fails_the_job_without_retry(status: int, tmp_path: Path, database: Database) -> None:
    scp = RefusingScp(status)
    try:
        settings = make_settings(
            tmp_path,
            [
                {
                    "name": "refuser",
                    "ae_title": "REFUSER",
                    "host": "127.0.0.1",
                    "port": scp.port,
                    "profile": {"objects": ["SEG", "SR"]},
                }
            ],
        )
        job_id = create_job(
            database,
            [CR_CHEST],
            synthetic_result([CR_CHEST], "chest_xray"),
            settings.results_dir,
            detector="chest_xray",
        )
        report = deliver_job(database, settings, job_id)
        assert report.state == JobState.DELIVERY_FAILED and report.retry == {}
        assert f"0x{status:04X}" in report.failed["refuser"]
        deliver_job(database, settings, job_id)  # a duplicate task: no retry storm
        job = job_row(database, job_id)
        assert job.state == JobState.DELIVERY_FAILED and f"0x{status:04X}" in (job.error or "")
        assert count(database, DeliveryAttempt, job_id) == 1
        assert scp.received == 1, "the first refusal ends the association"
    finally:
        scp.close()


def test_out_of_resources_is_retried_then_given_up(tmp_path: Path, sqlite_url: str) -> None:
    scp = RefusingScp(0xA700)
    db = Database(sqlite_url)
    try:
        settings = make_settings(
            tmp_path,
            [
                {
                    "name": "full",
                    "ae_title": "REFUSER",
                    "host": "127.0.0.1",
                    "port": scp.port,
                    "max_attempts": 2,
                    "profile": {"objects": ["SR"]},
                }
            ],
        )
        job_id = create_job(
            db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
        )
        assert deliver_job(db, settings, job_id).retry == {"full": 2.0}
        last = deliver_job(db, settings, job_id)
        assert last.state == JobState.DELIVERY_FAILED and "gave up after 2 attempts" in last.failed["full"]
    finally:
        scp.close()
        db.dispose()


class WebhookReceiver:
    """http.server in a thread: answers ``statuses`` in turn (then 200) and keeps the JSON bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/triage"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_abnormal_result_is_posted_to_the_webhook_with_retries(tmp_path: Path, database: Database) -> None:
    receiver = WebhookReceiver([503])
    try:
        settings = make_settings(tmp_path, [], [{"url": receiver.url}])
        result = synthetic_result([CR_CHEST], "chest_xray")
        job_id = create_job(database, [CR_CHEST], result, settings.results_dir, detector="chest_xray")
        first = deliver_job(database, settings, job_id)
        assert list(first.retry.values()) == [2.0]
        second = deliver_job(database, settings, job_id)
        assert second.state == JobState.DELIVERED
        assert len(receiver.bodies) == 2
        body = receiver.bodies[-1]
        assert body["study_instance_uid"] == "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
        assert body["accession_number"] is not None
        assert body["detector"] == "chest_xray" and body["abnormal"] is True
        assert body["score"] == pytest.approx(result.series_score) and body["threshold"] == 0.5
        assert body["finding"].startswith("1 region(s) above the pixel threshold; strongest 'Anomaly 1' score 0.95")
        assert "PatientName" not in json.dumps(body) and "PatientID" not in body

        normal = synthetic_result([CR_CHEST], "chest_xray", abnormal=False)
        normal_job = create_job(
            database, [CR_CHEST], normal, settings.results_dir, detector="chest_xray", predecessor_job_id=None
        )
        deliver_job(database, settings, normal_job)
        assert len(receiver.bodies) == 2, "normal results are not posted"
    finally:
        receiver.close()


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="orthanc-dicomweb is not installed (make test-deps)")
def test_stow_rs_to_orthanc_dicomweb(orthanc: Orthanc, sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        [{"name": "web", "kind": "stow-rs", "url": orthanc.dicomweb_url, "profile": {"objects": ["SEG", "SR", "SC"]}}],
    )
    db = Database(sqlite_url)
    job_id = create_job(
        db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
    )
    report = deliver_job(db, settings, job_id)
    assert report.state == JobState.DELIVERED, report
    assert len(orthanc.instances()) == 3
    db.dispose()


def test_storage_commitment_with_orthanc(orthanc: Orthanc, sqlite_url: str, tmp_path: Path) -> None:
    """Orthanc answers the N-ACTION with an N-EVENT-REPORT to the node's AE (declared in its DicomModalities)."""
    profile = {
        "storage_commitment": True,
        "storage_commitment_port": orthanc.node_port,
        "storage_commitment_bind_address": "127.0.0.1",
    }
    settings = make_settings(tmp_path, [orthanc_destination(orthanc, ["SEG", "SR"], profile=profile)])
    db = Database(sqlite_url)
    job_id = create_job(
        db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
    )
    report = deliver_job(db, settings, job_id)
    assert report.state == JobState.DELIVERED, report
    with db.session() as session:
        (attempt,) = session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job_id))
        assert "storage commitment confirmed for 2 instance(s)" in (attempt.detail or "")
    db.dispose()


def test_storage_commitment_without_report_is_retried(tmp_path: Path, sqlite_url: str) -> None:
    """A peer that accepts the N-ACTION but never reports: the attempt is a retry, not a success."""
    scp = RefusingScp(0x0000)
    db = Database(sqlite_url)
    try:
        settings = make_settings(
            tmp_path,
            [
                {
                    "name": "silent",
                    "ae_title": "REFUSER",
                    "host": "127.0.0.1",
                    "port": scp.port,
                    "profile": {"objects": ["SR"], "storage_commitment": True, "storage_commitment_timeout_seconds": 1},
                }
            ],
        )
        job_id = create_job(
            db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
        )
        report = deliver_job(db, settings, job_id)
        assert "silent" in report.retry and report.state == JobState.SUCCEEDED
        with db.session() as session:
            (attempt,) = session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job_id))
        assert attempt.outcome == "retry" and "storage commitment" in (attempt.detail or "")
    finally:
        scp.close()
        db.dispose()


def test_peer_accepting_only_implicit_vr_gets_implicit_vr(tmp_path: Path, sqlite_url: str) -> None:
    scp = RefusingScp(0x0000, ("1.2.840.10008.1.2",))
    db = Database(sqlite_url)
    try:
        destination = {
            "name": "old",
            "ae_title": "REFUSER",
            "host": "127.0.0.1",
            "port": scp.port,
            "profile": {"objects": ["SEG", "SR", "SC"]},
        }
        settings = make_settings(tmp_path, [destination])
        job_id = create_job(
            db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
        )
        assert deliver_job(db, settings, job_id).state == JobState.DELIVERED
        assert scp.transfer_syntaxes == ["1.2.840.10008.1.2"] * 3
    finally:
        scp.close()
        db.dispose()


def test_compressed_parametric_map_goes_decompressed_to_a_pacs_without_jpeg_2000(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The Parametric Map is stored as JPEG 2000 Lossless; a PACS that accepts only uncompressed syntaxes gets the
    same pixels decompressed (the SCU proposes the compressed syntax in a context of its own)."""
    files = brain_files()
    scp = RefusingScp(0x0000, ("1.2.840.10008.1.2.1",))
    db = Database(sqlite_url)
    try:
        destination = {
            "name": "plain",
            "ae_title": "REFUSER",
            "host": "127.0.0.1",
            "port": scp.port,
            "profile": {"objects": ["PM"]},
        }
        settings = make_settings(tmp_path, [destination])
        job_id = create_job(db, files, synthetic_result(files, "brain_mri"), settings.results_dir, detector="brain_mri")
        assert deliver_job(db, settings, job_id).state == JobState.DELIVERED
        assert scp.transfer_syntaxes == ["1.2.840.10008.1.2.1"]
        with db.session() as session:
            stored = session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)).one()
        as_stored = pydicom.dcmread(stored.file_path)
        assert as_stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless on disk
        received = scp.datasets[0]
        received.file_meta = pydicom.dataset.FileMetaDataset()
        received.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        assert (received.pixel_array == as_stored.pixel_array).all()  # lossless
    finally:
        scp.close()
        db.dispose()


def test_missing_source_file_fails_the_job_with_the_reason(tmp_path: Path, sqlite_url: str) -> None:
    copy = tmp_path / "spool" / "chest.dcm"
    copy.parent.mkdir()
    copy.write_bytes(CR_CHEST.read_bytes())
    db = Database(sqlite_url)
    settings = make_settings(tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    job_id = create_job(db, [copy], synthetic_result([copy], "chest_xray"), settings.results_dir, detector="chest_xray")
    copy.unlink()  # the spool lost the file
    report = deliver_job(db, settings, job_id)
    assert report.state == JobState.DELIVERY_FAILED
    job = job_row(db, job_id)
    assert "could not build the result objects: FileNotFoundError" in (job.error or "")
    assert count(db, DeliveryAttempt, job_id) == 0
    db.dispose()


def test_rerun_after_late_images_names_the_earlier_sr(tmp_path: Path, sqlite_url: str) -> None:
    """Job 2 re-runs the series with late images: same result series, new SR, earlier SR as predecessor."""
    pacs = RefusingScp(0x0000)  # a real SCP that stores nothing and answers success
    db = Database(sqlite_url)
    try:
        settings = make_settings(
            tmp_path,
            [
                {
                    "name": "pacs",
                    "ae_title": "REFUSER",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "profile": {"objects": ["SEG", "SR"]},
                }
            ],
        )
        files = brain_files()[70:100]
        first = create_job(
            db, files[:20], synthetic_result(files[:20], "brain_mri"), settings.results_dir, detector="brain_mri"
        )
        assert deliver_job(db, settings, first).state == JobState.DELIVERED
        second = create_job(
            db,
            files,
            synthetic_result(files, "brain_mri"),
            settings.results_dir,
            detector="brain_mri",
            predecessor_job_id=first,
        )
        assert deliver_job(db, settings, second).state == JobState.DELIVERED
        old = pydicom.dcmread(settings.results_dir / f"job-{first}" / "dicom" / "SR.dcm")
        new = pydicom.dcmread(settings.results_dir / f"job-{second}" / "dicom" / "SR.dcm")
        assert new.SeriesInstanceUID == old.SeriesInstanceUID and new.SOPInstanceUID != old.SOPInstanceUID
        reference = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == old.SOPInstanceUID
    finally:
        pacs.close()
        db.dispose()


# Stamped at build time (highdicom: the creation and content times, a random Dimension Organization UID).
BUILD_TIME_TAGS = {"00080013", "00080033", "0018A002", "00209164"}


def _stable(ds: pydicom.Dataset) -> Any:
    """A result object's JSON model without what differs between two builds of the same object."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: scrub(value) for key, value in node.items() if key not in BUILD_TIME_TAGS}
        if isinstance(node, list):
            return [scrub(value) for value in node]
        return node

    return scrub(ds.to_json_dict(bulk_data_threshold=1 << 30))


def test_result_kept_in_memory_builds_the_same_objects_and_the_files_go_as_written(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The detection's hand-over (result and headers kept in the worker process) builds the objects that reading
    the result and the headers from disk builds; the SCU sends each file's own data set."""
    scp = RefusingScp(0x0000)
    db = Database(sqlite_url)
    try:
        destination = {
            "name": "pacs",
            "ae_title": "REFUSER",
            "host": "127.0.0.1",
            "port": scp.port,
            "profile": {"objects": ["SEG", "SR"]},
        }
        settings = make_settings(tmp_path, [destination])
        result = synthetic_result([CR_CHEST], "chest_xray")
        job_id = create_job(db, [CR_CHEST], result, settings.results_dir, detector="chest_xray")
        assert deliver_job(db, settings, job_id).state == JobState.DELIVERED
        with db.session() as session:
            paths = [
                Path(p) for p in session.scalars(select(ResultObject.file_path).where(ResultObject.job_id == job_id))
            ]
        assert sorted(path.name for path in paths) == ["SEG-all-frames.dcm", "SR.dcm"]
        from_disk = [_stable(pydicom.dcmread(path)) for path in paths]
        for path, received in zip(paths, scp.datasets, strict=True):
            assert received == pydicom.dcmread(path)  # the data set of the file, as written

        source = pydicom.dcmread(CR_CHEST)  # as the detection read it: with its pixel data, decoded
        assert source.pixel_array.size
        result_path = job_row(db, job_id).result_path or ""
        handover.keep(job_id, result_path, SeriesResult.load(Path(result_path)), [source])
        assert "PixelData" not in source
        assert deliver_job(db, settings, job_id, force=True).state == JobState.DELIVERED
        assert [_stable(pydicom.dcmread(path)) for path in paths] == from_disk
        with db.session() as session:
            built = [
                detail or ""
                for detail in session.scalars(
                    select(JobEvent.detail).where(JobEvent.job_id == job_id, JobEvent.event == "results_built")
                )
            ]
        assert "kept in memory" not in built[0] and "(kept in memory: load " in built[1]
        assert len(scp.datasets) == 4
    finally:
        handover.clear()
        scp.close()
        db.dispose()


def test_a_kept_result_is_given_once_and_only_while_its_file_is_unchanged(tmp_path: Path) -> None:
    result = synthetic_result([CR_CHEST], "chest_xray")
    path = tmp_path / "job-7"
    result.save(path)
    handover.keep(7, path, result, [pydicom.dcmread(CR_CHEST)])
    assert handover.take(8, path) is None  # another job's delivery leaves it in place
    kept = handover.take(7, path)
    assert kept is not None and kept.result is result and list(kept.headers) == result.sop_instance_uids
    assert handover.take(7, path) is None  # once
    handover.keep(7, path, result, [pydicom.dcmread(CR_CHEST)])
    result.save(path.parent / "staging")
    (path / "series_result.npz").unlink()
    (path.parent / "staging" / "series_result.npz").rename(path / "series_result.npz")  # a re-run elsewhere
    assert handover.take(7, path) is None


def test_warm_up_builds_the_result_objects_of_a_made_up_series() -> None:
    """The worker warms the builders up before forking (workers.delivery_tasks); a failure there is only logged, so
    it is checked here."""
    warm_up()
