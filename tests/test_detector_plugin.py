"""A third detector added without touching the product: the toy ``knee_xray`` of tests/plugins/dn_knee_xray,
declared as a ``dicom_node.detectors`` entry point by a throw-away ``.dist-info`` (as a site's plugin would be
installed), is known to the registry, the configuration, the queues and the result builders, and runs end to end:
DCMTK storescu → ``dicom-node serve`` (receive, selection by a configured routing rule, job, embedded worker with
the toy detector, SEG + SR) → a real Orthanc.

Also here: the registry's rule for plugin entry points (a loader replaces a detector's loader, a spec declares a
detector). tests/test_config.py checks the error for a detector nobody installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import DICOM_DATA, REPO
from orthanc_server import Orthanc, running_orthanc
from receive_support import NodeProcess, newest_job_finished, storescu

from dicom_node.config import Settings
from dicom_node.db import Database, Job, JobState
from dicom_node.models import registry
from dicom_node.results.common import anatomy_code, procedure_code
from dicom_node.workers.app import default_queues, detection_queues, queue_for

PLUGINS = REPO / "tests" / "plugins"
# A real Fuji CR extremity radiograph (NEMA WG04 via pydicom-data), Body Part Examined EXTREMITY, view AP.
CR_EXTREMITY = DICOM_DATA / "cr" / "pydicom-data_RG3_J2KI_CR_extremity.dcm"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KNEE_RULE = {"name": "knee", "detector": "knee_xray", "modality": ["CR", "DX"], "body_part_examined": ["EXTREMITY"]}


def write_plugin(directory: Path, entry_points: str, name: str = "dn-knee-plugin") -> str:
    """A distribution (``.dist-info``) whose ``dicom_node.detectors`` entry points are ``entry_points``; returns the
    path entries (the folder and tests/plugins) that make it importable."""
    dist = directory / f"{name.replace('-', '_')}-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[dicom_node.detectors]\n{entry_points}")
    return os.pathsep.join([str(directory), str(PLUGINS)])


@pytest.fixture
def plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The knee plugin, visible to this process (sys.path) and to the subprocesses it starts (PYTHONPATH)."""
    path = write_plugin(tmp_path / "plugin", "knee_xray = dn_knee_xray:SPEC\n")
    for entry in reversed(path.split(os.pathsep)):
        monkeypatch.syspath_prepend(entry)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    registry.clear_cache()
    yield path
    registry.clear_cache()


def test_shipped_detectors_come_from_entry_points() -> None:
    registry.clear_cache()
    specs = registry.specs()
    assert list(specs) == ["brain_mri", "chest_xray"]
    for name, spec in specs.items():
        assert spec.name == name and spec.queue == name
        assert spec.weights == REPO / "models" / name / "weights"
        assert spec.model_card is not None and spec.model_card.is_file()
        assert registry.model_dir(name) == spec.weights
        assert registry.model_version(name) not in ("", registry.UNVERSIONED)
    assert registry.spec("brain_mri").loader == "dicom_node.models.brain_mri.detector:load_brain_mri"


def test_specs_are_read_without_torch(plugin_installed: str) -> None:
    """Listing detectors, reading the configuration, naming queues, model versions and result codes: no torch, no
    detector code (the node that receives and schedules never loads a model)."""
    code = (
        "import sys\n"
        "from dicom_node.config import Settings\n"
        "from dicom_node.models import registry\n"
        "from dicom_node.results.common import procedure_code\n"
        "from dicom_node.workers.app import detection_queues\n"
        "Settings(); detection_queues(); procedure_code('knee_xray')\n"
        "[registry.model_version(name) for name in registry.names()]\n"
        "code = ('torch', 'dicom_node.models.brain_mri.detector', 'dicom_node.models.chest_xray.detector',"
        " 'dn_knee_xray.detector')\n"
        "print(sorted(m for m in code if m in sys.modules), registry.names())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.split("\n")[0] == "[] ['brain_mri', 'chest_xray', 'knee_xray']"


def test_plugin_adds_a_detector_everywhere(plugin_installed: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        spec = registry.spec("knee_xray")
    assert "detector 'knee_xray' provided by plugin dn_knee_xray:SPEC" in caplog.text
    assert registry.names() == ["brain_mri", "chest_xray", "knee_xray"]
    assert registry.model_version("knee_xray") == "knee-toy-1"
    settings = Settings()
    assert list(settings.detectors) == ["brain_mri", "chest_xray", "knee_xray"]
    rules = [(rule.name, rule.detector) for rule in settings.selection.rules]
    # The plugin's default rule comes after the shipped detectors' and before the catch-all for other radiographs.
    assert rules[-2:] == [("knee", "knee_xray"), ("other-radiograph", None)]
    assert "knee_xray" in detection_queues() and queue_for("knee_xray") == spec.queue == "knee_xray"
    assert "knee_xray" in default_queues(settings)
    anatomy, procedure = anatomy_code("knee_xray"), procedure_code("knee_xray")
    assert anatomy is not None and (anatomy.value, anatomy.scheme_designator) == ("72696002", "SCT")
    assert (procedure.value, procedure.scheme_designator) == ("KNEE-TOY", "99DNTEST")
    detector = registry.default_registry().load("knee_xray", None, "cpu")
    assert detector.identity.version == "knee-toy-1"


def test_plugin_loader_replaces_only_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker tests' rule: a loader function named like a shipped detector replaces its loader only."""
    path = write_plugin(tmp_path, "brain_mri = dn_test_detectors:load_brain\n", "dn-test-loaders")
    for entry in reversed(path.split(os.pathsep)):
        monkeypatch.syspath_prepend(entry)
    registry.clear_cache()
    try:
        shipped = REPO / "models" / "brain_mri" / "weights"
        spec = registry.spec("brain_mri")
        assert spec.loader == "dn_test_detectors:load_brain"
        assert spec.weights == shipped and spec.queue == "brain_mri" and spec.selection
        assert type(registry.default_registry().load("brain_mri", tmp_path, "cpu")).__name__ == "IntensityTestDetector"
    finally:
        registry.clear_cache()


def test_plugin_loader_for_an_unknown_detector_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_plugin(tmp_path, "knee_xray = dn_test_detectors:load_brain\n", "dn-test-loaders")
    for entry in reversed(path.split(os.pathsep)):
        monkeypatch.syspath_prepend(entry)
    registry.clear_cache()
    try:
        with pytest.raises(RuntimeError, match="loader for an unknown detector.*DetectorSpec"):
            registry.specs()
    finally:
        registry.clear_cache()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(tmp_path / "orthanc")


def _codes(dataset: pydicom.Dataset) -> Iterator[tuple[str, str]]:
    """(value, scheme) of every coded concept anywhere in ``dataset``."""
    for element in dataset.iterall():
        if element.VR == "SQ":
            for item in element.value:
                if "CodeValue" in item and "CodingSchemeDesignator" in item:
                    yield str(item.CodeValue), str(item.CodingSchemeDesignator)


@pytest.mark.slow
def test_knee_detector_end_to_end(tmp_path: Path, sqlite_url: str, orthanc: Orthanc, plugin_installed: str) -> None:
    if not CR_EXTREMITY.exists():
        pytest.skip("shared DICOM data not found")
    source = pydicom.dcmread(CR_EXTREMITY, stop_before_pixels=True)
    node = NodeProcess(
        tmp_path / "data",
        sqlite_url,
        settings={
            "selection": {"rules": [KNEE_RULE]},
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
    node.start()
    db = Database(sqlite_url)
    try:
        sent = storescu(node.port, [CR_EXTREMITY])
        assert sent.returncode == 0, sent.stderr
        try:
            job = newest_job_finished(db, timeout=300)
        except AssertionError:
            print(node.log()[-6000:])
            raise
        assert job.detector == "knee_xray"
        assert job.state == JobState.DELIVERED, f"{job.state}: {job.error}\n{node.log()[-4000:]}"
        assert job.model_version == "knee-toy-1"  # the spec's weights folder, read by the scheduler
        assert job.series_score is not None and job.series_score >= job.image_threshold  # abnormal: a SEG
        assert "provided by plugin dn_knee_xray:SPEC" in node.log()

        with db.session() as session:
            results = {r.kind: r.file_path for r in session.get_one(Job, job.id).results}
        assert set(results) == {"SEG", "SR"}
        sr, seg = pydicom.dcmread(results["SR"]), pydicom.dcmread(results["SEG"])
        assert ("KNEE-TOY", "99DNTEST") in set(_codes(sr))  # Procedure Reported from the spec
        assert ("72696002", "SCT") in set(_codes(sr)) and ("72696002", "SCT") in set(_codes(seg))  # anatomy
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert referenced == {str(source.SOPInstanceUID)}

        in_pacs = [orthanc.tags(i) for i in orthanc.instances()]
        in_study = [t for t in in_pacs if t.get("StudyInstanceUID") == str(source.StudyInstanceUID)]
        classes = sorted(str(t.get("SOPClassUID")) for t in in_study)
        assert classes.count(SEG_SOP_CLASS) == 1 and classes.count(COMPREHENSIVE_3D_SR) == 1
    finally:
        node.stop()
        db.dispose()
