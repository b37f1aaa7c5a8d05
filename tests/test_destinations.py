"""Open destinations: a destination type defined here, in the test, and declared as a ``dicom_node.destinations``
entry point by a throw-away distribution (as a site's plug-in would be), receives a real job's results through the
same pipeline as C-STORE and STOW-RS, with no change to product code."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from result_data import CR_CHEST, create_job, synthetic_result
from sqlalchemy import select

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.db import Database
from dicom_node.db.models import DeliveryAttempt, JobState, ResultObject
from dicom_node.delivery import handover, pipeline
from dicom_node.delivery.destinations import DestinationType, known_kinds, registry
from dicom_node.delivery.pipeline import deliver_job
from dicom_node.delivery.transfer import ResultFile, SendOutcome
from dicom_node.models.base import SeriesResult


class FolderDestination(DestinationType):
    """A toy type: ``url`` is a folder the files are copied into; "committing" checks they are all there."""

    kind = "folder"
    requires = ("url",)
    supports_commitment = True
    sent: list[list[ResultFile]] = []  # every send's files, across instances (one instance per delivery)

    def send(self, files: Sequence[ResultFile]) -> SendOutcome:
        folder = Path(str(self.config.url))
        folder.mkdir(parents=True, exist_ok=True)
        for item in files:
            shutil.copyfile(item.path, folder / f"{item.sop_instance_uid}.dcm")
        FolderDestination.sent.append(list(files))
        return SendOutcome("stored", None, f"{len(files)} file(s) in {folder}")

    def commit(self, files: Sequence[ResultFile]) -> SendOutcome:
        folder = Path(str(self.config.url))
        missing = [item.sop_instance_uid for item in files if not (folder / f"{item.sop_instance_uid}.dcm").exists()]
        if missing:
            return SendOutcome("failed", None, f"{len(missing)} file(s) missing")
        return SendOutcome("stored", None, f"{len(files)} file(s) committed")


def install_types(directory: Path, monkeypatch: pytest.MonkeyPatch, **kinds: str) -> None:
    """A distribution whose ``dicom_node.destinations`` entry points are ``kinds`` (kind → "module:Class"), on
    sys.path for this test; the registry reads the entry points again."""
    dist = directory / "dn_test_destinations-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dn-test-destinations\nVersion: 0.0\n")
    lines = "".join(f"{kind} = {value}\n" for kind, value in kinds.items())
    (dist / "entry_points.txt").write_text(f"[dicom_node.destinations]\n{lines}")
    monkeypatch.syspath_prepend(str(directory))
    registry.clear_cache()


@pytest.fixture
def folder_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FolderDestination]]:
    FolderDestination.sent = []
    install_types(tmp_path / "plugin", monkeypatch, folder="test_destinations:FolderDestination")
    try:
        yield FolderDestination
    finally:
        monkeypatch.undo()
        registry.clear_cache()


def folder_settings(tmp_path: Path, *folders: tuple[str, dict[str, Any]]) -> Settings:
    return load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path / "node")},
            "destinations": [
                {"name": name, "kind": "folder", "url": str(tmp_path / name), **extra} for name, extra in folders
            ],
        }
    )


def test_a_destination_type_registered_by_the_test_receives_a_real_job(
    folder_type: type[FolderDestination], tmp_path: Path, sqlite_url: str
) -> None:
    settings = folder_settings(
        tmp_path,
        ("archive", {"profile": {"objects": ["SEG", "SR"], "storage_commitment": True}}),
        ("reports", {"profile": {"objects": ["SR"]}}),
    )
    db = Database(sqlite_url)
    try:
        job_id = create_job(
            db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
        )

        report = deliver_job(db, settings, job_id)

        assert report.state == JobState.DELIVERED, report
        assert report.stored == ["archive", "reports"] and report.failed == {} and report.retry == {}
        with db.session() as session:
            rows = {row.kind: row for row in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id))}
            attempts = {a.destination: a for a in session.scalars(select(DeliveryAttempt))}
        assert sorted(rows) == ["SEG", "SR"]
        archived = {path.stem for path in (tmp_path / "archive").iterdir()}
        assert archived == {row.sop_instance_uid for row in rows.values()}
        assert [path.stem for path in (tmp_path / "reports").iterdir()] == [rows["SR"].sop_instance_uid]
        # Commitment is asked of the type that supports it when the profile wants it, and only then.
        assert attempts["archive"].detail == "2 file(s) in " + str(tmp_path / "archive") + "; 2 file(s) committed"
        assert attempts["reports"].detail == "1 file(s) in " + str(tmp_path / "reports")
        # The pipeline names each file's SOP class, instance and transfer syntax as its file meta does.
        for item in [item for sent in folder_type.sent for item in sent]:
            meta = read_file_meta_info(item.path)
            assert (item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid) == (
                meta.MediaStorageSOPClassUID,
                meta.MediaStorageSOPInstanceUID,
                meta.TransferSyntaxUID,
            )

        again = deliver_job(db, settings, job_id)  # both hold the results: nothing is sent again
        assert again.stored == ["archive", "reports"] and len(folder_type.sent) == 2
    finally:
        db.dispose()


def test_the_source_headers_are_read_once_per_delivery_whatever_the_number_of_destinations(
    folder_type: type[FolderDestination], tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = folder_settings(tmp_path, ("one", {}), ("two", {}), ("three", {"profile": {"objects": ["SR"]}}))
    reads: list[str] = []
    real_dcmread = pydicom.dcmread

    def counting_dcmread(path: Any, *args: Any, **kwargs: Any) -> pydicom.Dataset:
        reads.append(str(path))
        return real_dcmread(path, *args, **kwargs)

    db = Database(sqlite_url)
    try:
        job_id = create_job(
            db, [CR_CHEST], synthetic_result([CR_CHEST], "chest_xray"), settings.results_dir, detector="chest_xray"
        )
        monkeypatch.setattr(pipeline.pydicom, "dcmread", counting_dcmread)  # pydicom's own: every reader counts
        assert deliver_job(db, settings, job_id).state == JobState.DELIVERED
        assert reads == [str(CR_CHEST)]

        # With the detection's hand-over (result and headers kept in this process), the spool is not read at all.
        reads.clear()
        with db.session() as session:
            result_path = session.scalars(select(pipeline.Job.result_path).where(pipeline.Job.id == job_id)).one()
        assert result_path is not None
        handover.keep(job_id, result_path, SeriesResult.load(Path(result_path)), [real_dcmread(CR_CHEST)])
        assert deliver_job(db, settings, job_id, force=True).state == JobState.DELIVERED
        assert reads == []
        assert len(folder_type.sent) == 6
    finally:
        handover.clear()
        db.dispose()


def test_configuration_checks_the_kind_and_the_fields_against_the_registry(
    folder_type: type[FolderDestination], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert known_kinds() == ("dimse", "stow-rs", "folder")
    with pytest.raises(ConfigError, match=r"destinations\.0: a folder destination needs url"):
        load_settings(overrides={"destinations": [{"name": "x", "kind": "folder"}]})
    monkeypatch.undo()  # the plug-in's distribution is gone
    registry.clear_cache()
    with pytest.raises(
        ConfigError, match=r"destinations\.0\.kind: unknown destination kind 'folder' \(known kinds: dimse, stow-rs\)"
    ):
        folder_settings(tmp_path, ("archive", {}))


class Impostor(FolderDestination):
    kind = "dimse"


def test_a_kind_belongs_to_one_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_types(tmp_path / "plugin", monkeypatch, dimse="test_destinations:Impostor")
    try:
        with pytest.raises(RuntimeError, match="destination kind 'dimse' is declared twice"):
            known_kinds()
    finally:
        monkeypatch.undo()
        registry.clear_cache()
    assert known_kinds() == ("dimse", "stow-rs")


def test_an_entry_point_must_name_a_destination_type_of_its_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_types(tmp_path / "plugin", monkeypatch, ftp="test_destinations:FolderDestination")
    try:
        assert "ftp" in known_kinds()
        with pytest.raises(RuntimeError, match="is not a DestinationType whose kind is 'ftp'"):
            registry.destination_type("ftp")
    finally:
        monkeypatch.undo()
        registry.clear_cache()
