"""Real source series with synthetic anomaly maps, and job rows that point at them (for the results tests)."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from conftest import DICOM_DATA

from dicom_node.db import Database
from dicom_node.db.models import Instance, Job, JobState, Series, Study, StudyState
from dicom_node.models.base import ModelIdentity, SeriesResult

BRAIN_DIR = DICOM_DATA / "mr_brain_t1_siemens"
CR_CHEST = DICOM_DATA / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"
DCIODVFY = Path("/usr/bin/dciodvfy")


def brain_files() -> list[Path]:
    return sorted(BRAIN_DIR.glob("*.dcm"))


def model(detector: str) -> ModelIdentity:
    return ModelIdentity(detector=detector, method="patchcore", version="test-1.0", weights_sha256="ab" * 32)


def synthetic_result(files: list[Path], detector: str, *, abnormal: bool = True) -> SeriesResult:
    """Low noise everywhere; when ``abnormal``, two blobs above the pixel threshold 0.5 (the second with enough of
    the first's evidence to be a region of its own under the default RegionRules)."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    rng = np.random.default_rng(5)
    # Coarse noise (8x8-pixel cells) stays below the threshold and compresses well in series_result.npz.
    coarse = rng.random((len(files), -(-rows // 8), -(-columns // 8)), dtype=np.float32) * 0.3
    maps = np.ascontiguousarray(np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :rows, :columns])
    if abnormal:
        if len(files) > 1:
            maps[80:95, 100:130, 90:120] = 0.9
            maps[30:40, 40:62, 40:62] = 0.85  # with a quarter of the first's evidence or more: kept
        else:
            maps[0, rows // 3 : rows // 2, columns // 5 : columns // 2] = 0.95
            maps[0, rows // 2 + 100 : rows // 2 + 340, columns // 2 + 150 : columns // 2 + 450] = 0.9
    scores = maps.reshape(len(files), -1).max(axis=1)
    return SeriesResult(
        model=model(detector),
        series_score=float(scores.max()),
        image_threshold=0.5,
        pixel_threshold=0.5,
        sop_instance_uids=[str(h.SOPInstanceUID) for h in headers],
        image_scores=scores.astype(np.float64),
        anomaly_maps=maps,
        scored=np.ones(len(files), dtype=bool),
    )


def write_brain_seg_and_sr(directory: Path) -> dict[str, Path]:
    """The SEG and SR the result builders make for the synthetic abnormal result of the Siemens T1 series, written to
    ``directory``: {"SEG": path, "SR": path} (for the tests that hand the files to other readers)."""
    from dicom_node.results.build import ObjectRequest, build_results

    files = brain_files()
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    built = build_results(
        headers,
        synthetic_result(files, "brain_mri"),
        [ObjectRequest("SEG"), ObjectRequest("SR")],
        read_pixels=lambda ds: pydicom.dcmread(files[0]),
    )
    paths = {}
    for key, dataset in built.objects.items():
        path = paths[key.split("-")[0]] = directory / f"{key}.dcm"
        dataset.save_as(path, enforce_file_format=True)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's output that start with "Error" (warnings are allowed)."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]


def create_job(
    db: Database,
    files: list[Path],
    result: SeriesResult,
    results_dir: Path,
    *,
    detector: str,
    predecessor_job_id: int | None = None,
    completed_seconds_ago: float = 5.0,
) -> int:
    """Study, series, instance and job rows for ``files`` (as the receive and detect steps would leave them)."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    first = headers[0]
    completed = datetime.now(UTC) - timedelta(seconds=completed_seconds_ago)
    with db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=str(first.StudyInstanceUID)).one_or_none()
        if study is None:
            study = Study(
                study_instance_uid=str(first.StudyInstanceUID),
                accession_number=str(first.get("AccessionNumber", ""))[:16] or None,
                modalities=str(first.Modality),
                state=StudyState.COMPLETE,
                completed_at=completed,
                instance_count=len(files),
            )
            session.add(study)
            session.flush()
        series = session.query(Series).filter_by(series_instance_uid=str(first.SeriesInstanceUID)).one_or_none()
        if series is None:
            series = Series(
                study_id=study.id,
                series_instance_uid=str(first.SeriesInstanceUID),
                modality=str(first.Modality),
                instance_count=len(files),
                detector=detector,
            )
            session.add(series)
            session.flush()
        known = {row.sop_instance_uid for row in session.query(Instance).filter_by(series_id=series.id)}
        for path, header in zip(files, headers, strict=True):
            if str(header.SOPInstanceUID) in known:
                continue
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(header.SOPInstanceUID),
                    sop_class_uid=str(header.SOPClassUID),
                    transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                    file_path=str(path),
                    size_bytes=path.stat().st_size,
                )
            )
        uids = sorted(result.sop_instance_uids)
        instance_hash = hashlib.sha256("\n".join(uids).encode()).hexdigest()
        # The score is in the key only so tests can add a second job (another outcome) over the same instances.
        key = hashlib.sha256(
            f"{series.series_instance_uid}|{detector}|{result.model.version}|{instance_hash}|{result.series_score}".encode()
        )
        job = Job(
            study_id=study.id,
            series_id=series.id,
            detector=detector,
            model_version=result.model.version,
            instance_set_hash=instance_hash,
            result_key=key.hexdigest(),
            state=JobState.SUCCEEDED,
            series_score=result.series_score,
            image_threshold=result.image_threshold,
            is_abnormal=result.is_abnormal,
            study_completed_at=completed,
            predecessor_job_id=predecessor_job_id,
        )
        session.add(job)
        session.flush()
        job_dir = results_dir / f"job-{job.id}"
        result.save(job_dir)
        job.result_path = str(job_dir)
        return job.id
