"""dcmqi (QIICR, the reader 3D Slicer's QuantitativeReporting uses) reads the node's SEG and SR: segimage2itkimage
turns the SEG into one image per segment with its label and display colour, tid1500reader the SR into measurement
groups with the verdict, the score and the link to the SEG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from result_data import brain_files, write_brain_seg_and_sr

# The venv's own scripts (pytest runs from .venv/bin without it on PATH).
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent))
TID1500READER = shutil.which("tid1500reader", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(
    SEGIMAGE2ITKIMAGE is None or TID1500READER is None, reason="dcmqi is not installed (the dev extra has it)"
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not brain_files():
        pytest.skip("shared DICOM data missing")
    return write_brain_seg_and_sr(tmp_path_factory.mktemp("dcmqi"))


def test_segimage2itkimage_reads_every_segment(written: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(
        [str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(written["SEG"]), "--outputDirectory", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ContentCreatorName"] == "dicom-node^AI"
    segments = [segment for group in meta["segmentAttributes"] for segment in group]
    assert [s["SegmentLabel"] for s in segments] == ["Anomaly 1", "Anomaly 2"]
    assert all("recommendedDisplayRGBValue" in s for s in segments)
    assert sorted(p.name for p in out.glob("*.nrrd")) == ["1.nrrd", "2.nrrd"]


def test_tid1500reader_reads_verdict_score_and_segment_links(written: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sr.json"
    run = subprocess.run(
        [str(TID1500READER), "--inputDICOM", str(written["SR"]), "--outputMetadata", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    groups = json.loads(out.read_text())["Measurements"]
    verdict = groups[0]
    assert verdict["TrackingIdentifier"] == "Series verdict: Abnormal"
    assert verdict["measurementItems"][0]["quantity"]["CodeMeaning"] == "Anomaly score"
    values = [q["conceptValue"] for q in verdict["qualitativeEvaluations"]]
    assert {"CodeMeaning": "Abnormal", "CodeValue": "263654008", "CodingSchemeDesignator": "SCT"} in values
    assert "Abnormal: anomaly score 0.9 at or above the threshold 0.5" in values  # the Comment, as text
    linked = [g for g in groups if "ReferencedSegment" in g]
    assert sorted(g["ReferencedSegment"] for g in linked) == [1, 2]
    seg = pydicom.dcmread(written["SEG"], stop_before_pixels=True)
    assert {g["segmentationSOPInstanceUID"] for g in linked} == {str(seg.SOPInstanceUID)}
