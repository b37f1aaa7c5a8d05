"""The whole product on one box, with real peers and the shipped detectors.

DCMTK storescu (the modality) → ``dicom-node serve`` (SCP, completion, selection, scheduler, embedded worker on the
embedded broker, the shipped detector weights, result builders, C-STORE SCU) → a real Orthanc (the PACS). The SEG
and the TID 1500 SR must appear in the same study in Orthanc, the SEG referencing the source instances, and the job
must end ``delivered`` in the job database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DICOM_DATA
from orthanc_server import Orthanc, running_orthanc
from receive_support import NodeProcess, newest_job_finished, storescu

from dicom_node.db import Database, Job, JobState

pytestmark = [pytest.mark.slow]

CR_CHEST = DICOM_DATA / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"
MR_SERIES = DICOM_DATA / "mr_brain_t1_siemens"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(tmp_path / "orthanc")


def _node(tmp_path: Path, sqlite_url: str, orthanc: Orthanc) -> NodeProcess:
    return NodeProcess(
        tmp_path / "data",
        sqlite_url,
        settings={
            "workers": {"embedded": True, "sweep_interval_seconds": 1.0, "device": "cpu"},
            "destinations": [
                {
                    "name": "orthanc",
                    "ae_title": orthanc.ae_title,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "profile": {"objects": ["SEG", "SR"], "keep_empty_frames": True},
                    "backoff_initial_seconds": 1.0,
                }
            ],
        },
    )


def _study_of(orthanc: Orthanc, study_uid: str) -> list[dict[str, str]]:
    tags = [orthanc.tags(instance_id) for instance_id in orthanc.instances()]
    return [t for t in tags if t.get("StudyInstanceUID") == study_uid]


@pytest.mark.parametrize(
    ("files", "detector"),
    [
        pytest.param([CR_CHEST], "chest_xray", id="cr-chest"),
        pytest.param(sorted(MR_SERIES.glob("*.dcm")), "brain_mri", id="mr-brain-176"),
    ],
)
def test_study_in_results_in_pacs(
    tmp_path: Path, sqlite_url: str, orthanc: Orthanc, files: list[Path], detector: str
) -> None:
    import pydicom

    if not files or not files[0].exists():
        pytest.skip("shared DICOM data not found")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    node = _node(tmp_path, sqlite_url, orthanc)
    node.start()
    db = Database(sqlite_url)
    try:
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr
        try:
            job = newest_job_finished(db, timeout=300)
        except AssertionError:
            print(node.log()[-6000:])
            raise
        assert job.detector == detector
        assert job.state == JobState.DELIVERED, f"{job.state}: {job.error}\n{node.log()[-4000:]}"
        assert job.series_score is not None and job.image_threshold is not None

        in_pacs = _study_of(orthanc, study_uid)
        by_class: dict[str, list[dict[str, str]]] = {}
        for tags in in_pacs:
            by_class.setdefault(str(tags.get("SOPClassUID")), []).append(tags)
        # The SR is always there (normal or abnormal), once; a SEG exists when a region passed the pixel threshold.
        assert len(by_class.get(COMPREHENSIVE_3D_SR, [])) == 1
        with db.session() as session:
            results = {r.kind: r for r in session.get_one(Job, job.id).results}
        assert "SR" in results
        if "SEG" in results:
            assert len(by_class.get(SEG_SOP_CLASS, [])) == 1
            seg = pydicom.dcmread(results["SEG"].file_path)
            referenced = {
                str(item.ReferencedSOPInstanceUID)
                for series in seg.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
            assert referenced <= source_uids and referenced
            source = pydicom.dcmread(files[0], stop_before_pixels=True)
            if "FrameOfReferenceUID" in source:
                assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    finally:
        node.stop()
        db.dispose()
