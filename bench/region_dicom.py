"""Region figures through DICOM: held-out-style series from val/ sent as a modality would, scored from the PACS.

    .venv/bin/python -m bench.region_dicom [--limit N] [--only brain|chest] [--slice-mm MM] [--keep DIR]

Writes, from ../shared/data:

* one axial FLAIR MR series per LGG val patient (brain_lgg/val, normal and tumour slices of the patient in slice
  order: slice 1 is the lowest), with made-up but consistent geometry: 1 mm pixels, Image Orientation (Patient)
  1\\0\\0\\0\\1\\0 (rows run to the patient's left, columns to posterior), Image Position (Patient) stepping head-ward
  by the slice spacing (default: 170 mm / slice count, rounded to 0.5 mm, 1 to 6 mm: the series covers skull base to
  vertex), 16-bit, MONOCHROME2;
* one DX study per cxr_nih val image (DX For Presentation, 12-bit, Imager Pixel Spacing 430 mm / 512 px, View
  Position from labels.csv, Body Part CHEST), alternately MONOCHROME1 (inverted pixels) and MONOCHROME2;

sends them all with DCMTK /usr/bin/storescu to ``dicom-node serve`` (embedded worker, embedded broker, SQLite, the
shipped detectors; destination profile SEG + SR) which delivers to a real Orthanc, waits until every study's job is
delivered, fetches the stored SR and SEG over Orthanc's REST API and scores them against the truth:

* brain, per series: the verdict in the SR (Tracking Identifier "Series verdict: ...") against the label (a series
  with a tumour mask is abnormal), the number of regions (SEG segments), whether a region overlaps the tumour, and
  the volume Dice of the SEG (all segments) against the stacked masks (0 for a series without a SEG); pooled too;
* chest, per study: verdict against the folder, regions, and for the abnormals with lesion boxes (boxes.csv) whether
  a SEG region overlaps a box (same test as ``dicom-node evaluate --boxes``' region figures).

``--limit N``: the first N LGG patients and N normal and N abnormal radiographs (abnormals with boxes first).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from bench.e2e import node
from bench.receive import REPO, orthanc
from dicom_node.db import Database, Job, JobState, Study
from dicom_node.models.metrics import dice
from dicom_node.models.region_evaluation import box_mask
from dicom_node.models.view_evaluation import read_boxes

DATA = REPO.parent / "shared" / "data"
LGG = DATA / "brain_lgg" / "val"
CXR = DATA / "cxr_nih"
MR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CXR_PIXEL_MM = 430.0 / 512.0
TERMINAL = {JobState.DELIVERED, JobState.FAILED, JobState.DELIVERY_FAILED}


@dataclass
class Case:
    """One study written from val/: its truth, and what the PACS got back."""

    kind: str  # "brain" | "chest"
    name: str  # LGG patient or NIH file name
    abnormal: bool
    study_uid: str
    files: list[Path]
    sop_to_index: dict[str, int]  # source SOP Instance UID → slice index (0-based) in ``truth``
    truth: np.ndarray  # (n, rows, cols) bool: tumour masks (brain) or boxes (chest; all False without boxes)
    has_truth: bool
    photometric: str = "MONOCHROME2"
    state: str = ""
    verdict: str | None = None
    regions: int = 0  # SEG segments
    sr_regions: set[str] = field(default_factory=set)  # the SR's region Tracking Identifiers ("Anomaly <n>")
    seg: np.ndarray | None = None  # (n, rows, cols) bool union of the SEG's segments in source geometry
    off_lesion: int = 0  # SEG segments that do not touch the truth
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- writing DICOM
def _base(sop_class: UID, study_uid: str, series_uid: str, patient: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName = patient.replace("_", "^", 1)
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "dicom-node bench"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def lgg_patients() -> dict[str, list[tuple[int, Path]]]:
    """patient → [(slice number, PNG)] in slice order (normal and tumour folders together)."""
    patients: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for folder in ("normal", "tumor"):
        for path in (LGG / folder).glob("*.png"):
            match = re.fullmatch(r"(.+)_(\d+)", path.stem)
            if match:
                patients[match.group(1)].append((int(match.group(2)), path))
    return {name: sorted(slices) for name, slices in sorted(patients.items())}


def slice_spacing(count: int, fixed: float | None) -> float:
    if fixed is not None:
        return fixed
    return float(min(max(round(170.0 / max(count, 1) * 2) / 2, 1.0), 6.0))


def write_lgg_series(patient: str, slices: list[tuple[int, Path]], out: Path, fixed_mm: float | None) -> Case:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    spacing = slice_spacing(len(slices), fixed_mm)
    folder = out / patient
    folder.mkdir(parents=True)
    files, masks, sop_to_index = [], [], {}
    for index, (number, path) in enumerate(slices):
        pixels = _png(path).astype(np.uint16) * 16  # 8-bit PNG → 12-bit
        rows, cols = pixels.shape
        mask_file = LGG / "masks" / path.name
        masks.append(_png(mask_file) > 0 if mask_file.is_file() else np.zeros((rows, cols), dtype=bool))
        ds = _base(MR_STORAGE, study, series, patient, "MR")
        ds.StudyDescription = "MR BRAIN"
        ds.SeriesDescription = "AX FLAIR"
        ds.BodyPartExamined = "BRAIN"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE\\IR", "SK", "", "2D"
        ds.SequenceName = "FLAIR"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        z = (number - 1) * spacing
        ds.ImagePositionPatient = [-(cols - 1) / 2.0, -(rows - 1) / 2.0, z]
        ds.SliceLocation = z
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = spacing
        ds.SpacingBetweenSlices = spacing
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = pixels.tobytes()
        target = folder / f"{number:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
        sop_to_index[str(ds.SOPInstanceUID)] = index
    truth = np.stack(masks)
    return Case("brain", patient, bool(truth.any()), study, files, sop_to_index, truth, bool(truth.any()))


def cxr_cases(limit: int | None) -> list[tuple[str, Path, dict[str, str]]]:
    """(folder, PNG, labels.csv row) of the val radiographs; with ``limit``, N per folder (boxed abnormals first)."""
    with open(CXR / "labels.csv", newline="", encoding="utf-8") as handle:
        labels = {row["file"]: row for row in csv.DictReader(handle)}
    boxes = read_boxes(CXR / "boxes.csv")
    chosen = []
    for folder in ("normal", "abnormal"):
        files = sorted((CXR / "val" / folder).glob("*.png"))
        if limit is not None:
            files = sorted(files, key=lambda p: (p.name not in boxes, p.name))[:limit]
        chosen += [(folder, path, labels.get(path.name, {})) for path in files]
    return chosen


def write_cxr_study(folder: str, path: Path, row: dict[str, str], monochrome1: bool, out: Path, boxes: Any) -> Case:
    study, series = generate_uid(), generate_uid()
    image = _png(path).astype(np.uint16) * 16
    stored = (4095 - image) if monochrome1 else image
    rows, cols = image.shape
    ds = _base(DX_PRESENTATION, study, series, f"NIH_{row.get('patient_id') or path.stem}", "DX")
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {row.get('view', '')}".strip()
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = (row.get("view") or "").upper()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [CXR_PIXEL_MM, CXR_PIXEL_MM]
    ds.InstanceNumber = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = stored.astype(np.uint16).tobytes()
    target = out / f"{path.stem}.dcm"
    ds.save_as(target, enforce_file_format=True)
    entries = boxes.get(path.name) or []
    truth = box_mask((rows, cols), entries)[np.newaxis]
    return Case(
        "chest",
        path.name,
        folder == "abnormal",
        study,
        [target],
        {str(ds.SOPInstanceUID): 0},
        truth,
        bool(entries),
        photometric=str(ds.PhotometricInterpretation),
    )


# ----------------------------------------------------------------------------------------------- the chain
def storescu(port: int, files: list[Path]) -> None:
    for start in range(0, len(files), 500):  # keep the command line short
        subprocess.run(
            ["/usr/bin/storescu", "-aet", "BENCH", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
            + [str(f) for f in files[start : start + 500]],
            check=True,
            capture_output=True,
        )


def wait_jobs(db: Database, cases: list[Case], timeout: float) -> None:
    """Until every case's study has a job in a final state (or ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    pending = {case.study_uid: case for case in cases}
    while pending and time.monotonic() < deadline:
        with db.session() as session:
            for uid, case in list(pending.items()):
                study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
                if study is None:
                    continue
                jobs = session.scalars(select(Job).where(Job.study_id == study.id)).all()
                if jobs and all(job.state in TERMINAL for job in jobs):
                    case.state = ",".join(sorted({str(job.state) for job in jobs}))
                    errors = [job.error for job in jobs if job.error]
                    case.notes += [str(e)[:200] for e in errors]
                    del pending[uid]
        time.sleep(1.0)
    for case in pending.values():
        case.state = "timeout"


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def read_sr(ds: Dataset, case: Case) -> None:
    """Verdict from the series group's Tracking Identifier; the region groups' Tracking Identifiers."""
    for item in _walk(ds.get("ContentSequence")):
        if item.get("ValueType") != "TEXT":
            continue
        value = str(item.get("TextValue", ""))
        if value.startswith("Series verdict:"):
            case.verdict = value.split(":", 1)[1].strip()
        elif re.fullmatch(r"Anomaly \d+", value):
            case.sr_regions.add(value)


def read_seg(ds: Dataset, case: Case) -> None:
    """Union of all segments per source image, in source geometry; the segment count."""
    case.regions = len(ds.SegmentSequence)
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    _, rows, cols = case.truth.shape
    seg = np.zeros((len(case.truth), rows, cols), dtype=bool)
    touches: dict[int, bool] = {int(item.SegmentNumber): False for item in ds.SegmentSequence}
    shared = ds.SharedFunctionalGroupsSequence[0]  # one segment: its identification may be shared by all frames
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        index = case.sop_to_index.get(uid)
        if index is None:
            case.notes.append(f"SEG frame references unknown instance {uid}")
            continue
        pixels_on = frame[:rows, :cols] > 0
        seg[index] |= pixels_on
        identification = item.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        number = int(identification[0].ReferencedSegmentNumber)
        touches[number] = touches.get(number, False) or bool((pixels_on & case.truth[index]).any())
    case.seg = seg
    case.off_lesion = sum(not touched for touched in touches.values())


def fetch_results(url: str, cases: list[Case]) -> None:
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for case in cases:
            for modality in ("SR", "SEG"):
                found = client.post(
                    "/tools/find",
                    json={
                        "Level": "Series",
                        "Query": {"StudyInstanceUID": case.study_uid, "Modality": modality},
                        "Expand": True,
                    },
                ).json()
                instances = [i for series in found for i in series["Instances"]]
                if len(instances) > 1:
                    case.notes.append(f"{len(instances)} {modality} instances, reading the first")
                if instances:
                    ds = dcmread(io.BytesIO(client.get(f"/instances/{instances[0]}/file").content))
                    (read_sr if modality == "SR" else read_seg)(ds, case)
            if len(case.sr_regions) != case.regions:
                case.notes.append(f"SR has {len(case.sr_regions)} region(s), SEG {case.regions} segment(s)")


# ----------------------------------------------------------------------------------------------- scoring
def _share(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.3f} ({numerator}/{denominator})" if denominator else "n/a"


def _count(cases: list[Case], verdict: str) -> int:
    return sum(c.verdict == verdict for c in cases)


def on_lesion(case: Case) -> bool:
    return case.seg is not None and bool((case.seg & case.truth).any())


def report_brain(cases: list[Case]) -> list[str]:
    lines = [
        f"{'patient':<24} {'slices':>6} {'label':>8} {'verdict':>8} {'regions':>7} {'off tumour':>10} {'vol Dice':>8}"
    ]
    dices, inter, total = [], 0, 0
    for case in cases:
        seg = case.seg if case.seg is not None else np.zeros_like(case.truth)
        d = dice(seg, case.truth)
        dices.append(d)
        inter += int((seg & case.truth).sum())
        total += int(seg.sum()) + int(case.truth.sum())
        lines.append(
            f"{case.name:<24} {len(case.files):>6} {'Abnormal' if case.abnormal else 'Normal':>8} "
            f"{case.verdict or case.state:>8} {case.regions:>7} {case.off_lesion:>10} {d:>8.3f}"
        )
    abnormal = [c for c in cases if c.abnormal]
    normal = [c for c in cases if not c.abnormal]
    lines += [
        f"series sensitivity (Abnormal verdict)   {_share(_count(abnormal, 'Abnormal'), len(abnormal))}",
        f"series specificity                      {_share(_count(normal, 'Normal'), len(normal))}",
        f"regions per series (max)                {np.mean([c.regions for c in cases]):.2f} "
        f"({max(c.regions for c in cases)})",
        f"series with a region on the tumour      {_share(sum(on_lesion(c) for c in abnormal), len(abnormal))}",
        f"regions off the tumour per series       {sum(c.off_lesion for c in cases) / len(cases):.2f}",
        f"volume Dice, mean over series           {np.mean(dices):.3f} (no SEG: 0)",
        f"  over the Abnormal-verdict series      {_mean_dice(cases, dices)}",
        f"volume Dice, pooled over series         {2 * inter / total if total else 1.0:.3f}",
    ]
    return lines


def _mean_dice(cases: list[Case], dices: list[float]) -> str:
    flagged = [d for case, d in zip(cases, dices, strict=True) if case.verdict == "Abnormal"]
    return f"{np.mean(flagged):.3f} (n={len(flagged)})" if flagged else "n/a"


def report_chest(cases: list[Case]) -> list[str]:
    normal = [c for c in cases if not c.abnormal]
    abnormal = [c for c in cases if c.abnormal]
    boxed = [c for c in abnormal if c.has_truth]
    flagged_boxed = [c for c in boxed if c.verdict == "Abnormal"]
    lines = [
        f"studies: {len(normal)} normal, {len(abnormal)} abnormal ({len(boxed)} with boxes)",
        f"sensitivity                             {_share(_count(abnormal, 'Abnormal'), len(abnormal))}",
        f"specificity                             {_share(_count(normal, 'Normal'), len(normal))}",
    ]
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        n = [c for c in normal if c.photometric == photometric]
        a = [c for c in abnormal if c.photometric == photometric]
        lines.append(
            f"  {photometric}: sensitivity {_share(_count(a, 'Abnormal'), len(a))}, "
            f"specificity {_share(_count(n, 'Normal'), len(n))}"
        )
    fp = sum(c.regions for c in normal)
    lines += [
        f"false-positive regions per normal       {fp / max(len(normal), 1):.3f} ({fp}/{len(normal)})",
        f"regions per abnormal                    {sum(c.regions for c in abnormal) / max(len(abnormal), 1):.3f}",
        f"boxed abnormals' regions off the boxes  {sum(c.off_lesion for c in boxed)}",
        f"boxed abnormals with a region on a box  {_share(sum(on_lesion(c) for c in boxed), len(boxed))}",
        f"  of those flagged Abnormal             {_share(sum(map(on_lesion, flagged_boxed)), len(flagged_boxed))}",
        f"Abnormal without region / Normal with   {sum(c.verdict == 'Abnormal' and c.regions == 0 for c in cases)} / "
        f"{sum(c.verdict == 'Normal' and c.regions > 0 for c in cases)}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="N LGG patients, N normal + N abnormal radiographs")
    parser.add_argument("--only", choices=["brain", "chest"], default=None)
    parser.add_argument("--slice-mm", type=float, default=None, help="MR slice spacing (default: 170 mm / slices)")
    parser.add_argument("--quiet", type=float, default=2.0, help="the node's study quiet time (s)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="give up waiting for results after this (s)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the written series and logs here")
    args = parser.parse_args(argv)

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-region-dicom-"))
    try:
        cases: list[Case] = []
        if args.only != "chest":
            patients = list(lgg_patients().items())[: args.limit]
            cases += [write_lgg_series(name, slices, work / "mr", args.slice_mm) for name, slices in patients]
        if args.only != "brain":
            boxes = read_boxes(CXR / "boxes.csv")
            (work / "dx").mkdir()
            chosen = cxr_cases(args.limit)
            cases += [
                write_cxr_study(folder, path, row, i % 2 == 0, work / "dx", boxes)
                for i, (folder, path, row) in enumerate(chosen)
            ]
        written = time.monotonic()
        with orthanc(work) as pacs, node(work, pacs.port, args.quiet) as (port, db_url):
            assert pacs.rest_url is not None
            url = pacs.rest_url
            db = Database(db_url, upgrade=False)
            sent_at = time.monotonic()
            storescu(port, [f for case in cases for f in case.files])
            sent = time.monotonic()
            wait_jobs(db, cases, args.timeout)
            done = time.monotonic()
            db.dispose()
            fetch_results(url, cases)
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    brain = [c for c in cases if c.kind == "brain"]
    chest = [c for c in cases if c.kind == "chest"]
    print(
        f"wrote {len(cases)} studies in {written - began:.0f} s; storescu {sent - sent_at:.0f} s; "
        f"all jobs final {done - sent_at:.0f} s after the first C-STORE; total {time.monotonic() - began:.0f} s"
    )
    states: dict[str, int] = defaultdict(int)
    for case in cases:
        states[case.state] += 1
    print("job states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    for case in cases:
        for note in case.notes:
            print(f"note {case.name}: {note}")
    if brain:
        print(f"\nBrain: {len(brain)} axial FLAIR series (LGG val)")
        print("\n".join(report_brain(brain)))
    if chest:
        print(f"\nChest: {len(chest)} DX studies (cxr_nih val)")
        print("\n".join(report_chest(chest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
