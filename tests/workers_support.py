"""Helpers shared by the worker tests: job database rows pointing at real DICOM files, broker-free dispatchers.

Studies, series and instances are created directly in the job database (the SCP is tested elsewhere); the instance
files are real MR slices from ../shared/data/dicom, rewritten with fresh UIDs so that every test series is a
distinct series as a modality would send it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from conftest import DICOM_DATA
from pydicom.uid import generate_uid

from dicom_node.db import Database, Instance, Job, Series, Study, StudyState

MR_DIR = DICOM_DATA / "mr_brain_t1_siemens"


def source_files(count: int) -> list[Path]:
    files = sorted(MR_DIR.glob("*"))
    files = [path for path in files if path.is_file()]
    return files[:count]


@dataclass
class MadeSeries:
    study_id: int
    series_id: int
    study_uid: str
    series_uid: str
    sop_uids: list[str] = field(default_factory=list)


def write_series(directory: Path, slices: int = 3) -> tuple[str, str, list[tuple[str, Path, pydicom.Dataset]]]:
    """Copy ``slices`` real MR slices into ``directory`` with a new study/series and new SOP Instance UIDs."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    written = []
    for index, source in enumerate(source_files(slices)):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = directory / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((ds.SOPInstanceUID, path, ds))
    return study_uid, series_uid, written


def make_study(
    db: Database,
    directory: Path,
    *,
    slices: int = 3,
    detector: str | None = "brain_mri",
    calling_ae_title: str = "MODALITY",
) -> MadeSeries:
    """A complete study with one MR series routed to ``detector``, as the receive side leaves it."""
    study_uid, series_uid, written = write_series(directory, slices)
    now = datetime.now(UTC)
    with db.session() as session:
        study = Study(
            study_instance_uid=study_uid,
            modalities="MR",
            calling_ae_title=calling_ae_title,
            state=StudyState.COMPLETE,
            completed_at=now,
            completion_reason="test",
            completion_count=1,
            instance_count=len(written),
        )
        session.add(study)
        session.flush()
        series = Series(
            study_id=study.id,
            series_instance_uid=series_uid,
            modality="MR",
            instance_count=len(written),
            detector=detector,
            routing_rule="brain-mr" if detector else None,
            routed_at=now,
        )
        session.add(series)
        session.flush()
        for uid, path, ds in written:
            add_instance(session, series.id, uid, path, ds)
        return MadeSeries(study.id, series.id, study_uid, series_uid, [uid for uid, _, _ in written])


def add_instance(session, series_id: int, uid: str, path: Path, ds: pydicom.Dataset) -> None:  # type: ignore[no-untyped-def]
    session.add(
        Instance(
            series_id=series_id,
            sop_instance_uid=uid,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            instance_number=int(ds.get("InstanceNumber", 0) or 0),
            file_path=str(path),
            size_bytes=path.stat().st_size,
            calling_ae_title="MODALITY",
        )
    )


def add_late_instance(db: Database, made: MadeSeries, directory: Path) -> str:
    """One more slice of the same series arriving after completion (a new instance set)."""
    source = source_files(len(made.sop_uids) + 1)[-1]
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = made.study_uid
    ds.SeriesInstanceUID = made.series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / f"late-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with db.session() as session:
        add_instance(session, made.series_id, ds.SOPInstanceUID, path, ds)
    made.sop_uids.append(ds.SOPInstanceUID)
    return str(ds.SOPInstanceUID)


class RecordingDispatcher:
    """Keeps the messages it was asked to send, for state-machine tests that need no broker."""

    def __init__(self, fail: bool = False) -> None:
        self.detections: list[tuple[int, float | None]] = []
        self.deliveries: list[int] = []
        self.fail = fail

    def enqueue_detection(self, job: Job, *, countdown: float | None = None) -> str:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.detections.append((job.id, countdown))
        return f"task-{job.id}-{len(self.detections)}"

    def enqueue_delivery(self, job: Job, *, force: bool = False) -> str:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.deliveries.append(job.id)
        return f"deliver-{job.id}"
