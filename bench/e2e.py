"""End-to-end latency: last instance received → results stored in the PACS, quiet timer excluded.

    .venv/bin/python -m bench.e2e [--repeat 3] [--quiet 2] [--abnormal] [--stages]

Starts a real Orthanc and ``dicom-node serve`` (embedded worker, embedded broker, SQLite, the shipped detectors),
sends the CR chest and the 176-slice Siemens T1 series with DCMTK storescu (each repeat under new UIDs, so every run
is a new study), and reads the timestamps from the job database:

* ``received→stored``: last Instance.received_at → the successful DeliveryAttempt.finished_at, minus the quiet time;
* ``complete→stored``: Study.completed_at → the same (what the node itself adds after the study is complete).

``--abnormal`` adds an LGG-style FLAIR series with a tumour (bench.region_dicom's writer, the val patient with the
largest tumour), which the brain detector calls Abnormal: the SEG + SR path. ``--stages`` prints, per study, the
median of each stage between complete and stored, from the job's timeline (JobEvent rows and the delivery attempt):

* ``schedule``: Study.completed_at → Job.queued_at (jobs created, message sent);
* ``pickup``: queued → the worker took the lease (broker polling, message hand-over);
* ``detect``: lease → result recorded; split, where the worker records it in the "succeeded" event, into ``read``
  (files read from the spool), ``score`` (pixel decode, preprocessing and the model) and ``save`` (the hand-over
  file);
* ``to-delivery``: result recorded → delivery task started (broker polling again);
* ``build``: the delivery task's work before sending: result and headers loaded, objects built and written (its
  own split in the "results_built" event);
* ``send``: the C-STORE attempt (association, transfer, Orthanc's store, release).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.uid import JPEG2000, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bench.receive import CHEST, DICOM_NODE, SIEMENS, free_port, orthanc, wait_port
from dicom_node.db import Database, DeliveryAttempt, Instance, Job, JobEvent, JobState, Series, Study


@contextmanager
def node(work: Path, pacs_port: int, quiet: float) -> Iterator[tuple[int, str]]:
    port = free_port()
    data = work / "node"
    data.mkdir()
    url = f"sqlite:///{data / 'jobs.sqlite'}"
    config = data / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "DICOMNODE", "port": port, "data_dir": str(data), "bind_address": "127.0.0.1"},
                "storage": {"min_free_bytes": 100_000_000},
                "completion": {"quiet_seconds": quiet, "check_interval_seconds": 0.2},
                "http": {"port": 0},
                "workers": {"embedded": True, "device": "cpu"},
                "destinations": [
                    {
                        "name": "orthanc",
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": pacs_port,
                        "profile": {"objects": ["SEG", "SR"]},
                    }
                ],
                "logging": {"level": "WARNING"},
            }
        )
    )
    log = (data / "node.log").open("wb")
    process = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(config)], stdout=log, stderr=log)
    try:
        wait_port(port, process)
        yield port, url
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def renamed_copy(files: list[Path], out: Path) -> list[Path]:
    """The same images under new Study/Series/SOP Instance UIDs (a new study each repeat)."""
    out.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    copies = []
    for index, path in enumerate(files):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / f"{index:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        copies.append(target)
    return copies


def send(port: int, files: list[Path]) -> None:
    # DCMTK storescu proposes uncompressed syntaxes unless told; the CR chest is JPEG 2000 (lossy): -xw.
    syntax = str(dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    proposal = ["-xw"] if syntax == JPEG2000 else []
    subprocess.run(
        [
            "/usr/bin/storescu",
            "-aet",
            "BENCH",
            "-aec",
            "DICOMNODE",
            *proposal,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
    )


@dataclass
class Run:
    """One study's way through the node: the headline figures and the stages between complete and stored."""

    received_to_stored: float  # quiet time not yet subtracted
    complete_to_stored: float
    stages: dict[str, float] = field(default_factory=dict)


SPLIT = re.compile(r"([a-z][a-z-]*) ([0-9.]+) s")


def _split(detail: str | None) -> dict[str, float]:
    """``... in 3.8 s (read 0.71 s, score 3.02 s, ...)`` (the event's last parentheses) → {"read": 0.71, ...}."""
    inside = (detail or "").rpartition("(")[2]
    return {name: float(value) for name, value in SPLIT.findall(inside)}


def _seconds(start: datetime | None, end: datetime | None) -> float:
    return float("nan") if start is None or end is None else (end - start).total_seconds()


def stages_of(session: Session, job: Job, study: Study, attempt: DeliveryAttempt) -> dict[str, float]:
    events = {event.event: event for event in session.scalars(select(JobEvent).where(JobEvent.job_id == job.id))}
    started, succeeded, built = events.get("started"), events.get("succeeded"), events.get("results_built")
    stages = {
        "schedule": _seconds(study.completed_at, job.queued_at),
        "pickup": _seconds(job.queued_at, started.at if started else None),
        "detect": _seconds(started.at if started else None, job.finished_at),
    }
    stages.update({f"  {name}": value for name, value in _split(succeeded.detail if succeeded else None).items()})
    if built is not None:
        took = float(re.search(r" in ([0-9.]+) s", built.detail or " in nan s").group(1))  # type: ignore[union-attr]
        stages["to-delivery"] = _seconds(job.finished_at, built.at) - took
        stages["build"] = took
        stages.update({f"  {name}": value for name, value in _split(built.detail).items()})
    else:
        stages["to-delivery+build"] = _seconds(job.finished_at, attempt.started_at)
    stages["send"] = _seconds(attempt.started_at, attempt.finished_at)
    return stages


def wait_delivered(db: Database, study_uid: str, timeout: float = 600) -> Run:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            job = None if study is None else session.scalar(select(Job).where(Job.study_id == study.id))
            if job is not None and job.state in (JobState.FAILED, JobState.DELIVERY_FAILED):
                raise RuntimeError(f"job {job.id} {job.state}: {job.error}")
            if job is not None and job.state == JobState.DELIVERED and study is not None:
                attempt = session.scalar(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.job_id == job.id, DeliveryAttempt.outcome.in_(["stored", "warning"]))
                    .order_by(DeliveryAttempt.finished_at.desc())
                )
                last = session.scalar(
                    select(func.max(Instance.received_at)).join(Series).where(Series.study_id == study.id)
                )
                assert attempt is not None and attempt.finished_at is not None and last is not None
                assert study.completed_at is not None
                stored = attempt.finished_at
                return Run(
                    (stored - last).total_seconds(),
                    (stored - study.completed_at).total_seconds(),
                    stages_of(session, job, study, attempt),
                )
        time.sleep(0.2)
    raise TimeoutError(f"study {study_uid} not delivered within {timeout} s")


def abnormal_series(out: Path) -> list[Path]:
    """An LGG-style axial FLAIR series with a tumour (the val patient with the largest one), as region_dicom writes."""
    from bench.region_dicom import LGG, lgg_patients, write_lgg_series

    patients = lgg_patients()

    def tumour_pixels(name: str) -> int:
        total = 0
        for _, path in patients[name]:
            mask = LGG / "masks" / path.name
            total += mask.stat().st_size if mask.is_file() else 0  # PNG size: a cheap proxy for the tumour's extent
        return total

    patient = max(patients, key=tumour_pixels)
    return write_lgg_series(patient, patients[patient], out, None).files


def print_stages(name: str, runs: list[Run]) -> None:
    names: list[str] = []
    for run in runs:
        names += [key for key in run.stages if key not in names]
    print(f"\n{name}: stages between complete and stored (median of {len(runs)}, s)")
    for key in names:
        values = [run.stages[key] for run in runs if key in run.stages]
        print(f"  {key:22} {statistics.median(values):7.3f}   (min {min(values):.3f}, max {max(values):.3f})")
    print(f"  {'complete→stored':22} {statistics.median(r.complete_to_stored for r in runs):7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--abnormal", action="store_true", help="add an LGG-style tumour series (SEG + SR)")
    parser.add_argument("--stages", action="store_true", help="print where the time goes, stage by stage")
    parser.add_argument("--only", choices=["cr", "mr", "abnormal"], action="append", help="run only these studies")
    args = parser.parse_args(argv)
    rows = []
    runs_by_case: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {"CR chest (1 instance)": [CHEST], "MR T1 (176 slices)": sorted(SIEMENS.glob("*.dcm"))}
        if args.abnormal:
            files = abnormal_series(work / "lgg")
            cases[f"LGG FLAIR ({len(files)}, abn.)"] = files
        if args.only:
            cases = {name: files for name, files in cases.items() if _key(name) in args.only}
        with orthanc(work) as pacs, node(work, pacs.port, args.quiet) as (port, url):
            db = Database(url, upgrade=False)
            time.sleep(5)  # let the embedded worker load both detectors (kept warm afterwards)
            for name, files in cases.items():
                runs = []
                for run in range(args.repeat):
                    copies = renamed_copy(files, work / f"{_key(name)}-{run}")
                    study_uid = str(dcmread(copies[0], stop_before_pixels=True).StudyInstanceUID)
                    send(port, copies)
                    runs.append(wait_delivered(db, study_uid))
                received = [run.received_to_stored - args.quiet for run in runs]
                complete = [run.complete_to_stored for run in runs]
                rows.append((name, statistics.median(received), max(received), statistics.median(complete)))
                runs_by_case[name] = runs
            db.dispose()
    print(f"{'study':24} {'received→stored (s, quiet excluded) median':>44} {'max':>6} {'complete→stored median':>24}")
    for name, median, worst, complete_median in rows:
        print(f"{name:24} {median:44.2f} {worst:6.2f} {complete_median:24.2f}")
    if args.stages:
        for name, runs in runs_by_case.items():
            print_stages(name, runs)
    return 0


def _key(name: str) -> str:
    return "cr" if name.startswith("CR") else "mr" if name.startswith("MR") else "abnormal"


if __name__ == "__main__":
    raise SystemExit(main())
