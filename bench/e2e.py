"""End-to-end latency: last instance received → results stored in the PACS, quiet timer excluded.

    .venv/bin/python -m bench.e2e [--repeat 3] [--quiet 2]

Starts a real Orthanc and ``dicom-node serve`` (embedded worker, embedded broker, SQLite, the shipped detectors),
sends the CR chest and the 176-slice Siemens T1 series with DCMTK storescu (each repeat under new UIDs, so every run
is a new study), and reads the timestamps from the job database:

* ``received→stored``: last Instance.received_at → the successful DeliveryAttempt.finished_at, minus the quiet time;
* ``complete→stored``: Study.completed_at → the same (what the node itself adds after the study is complete).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.uid import JPEG2000, generate_uid
from sqlalchemy import func, select

from bench.receive import CHEST, DICOM_NODE, SIEMENS, free_port, orthanc, wait_port
from dicom_node.db import Database, DeliveryAttempt, Instance, Job, JobState, Series, Study


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


def wait_delivered(db: Database, study_uid: str, timeout: float = 600) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            job = None if study is None else session.scalar(select(Job).where(Job.study_id == study.id))
            if job is not None and job.state in (JobState.FAILED, JobState.DELIVERY_FAILED):
                raise RuntimeError(f"job {job.id} {job.state}: {job.error}")
            if job is not None and job.state == JobState.DELIVERED and study is not None:
                stored = session.scalar(
                    select(func.max(DeliveryAttempt.finished_at)).where(
                        DeliveryAttempt.job_id == job.id, DeliveryAttempt.outcome.in_(["stored", "warning"])
                    )
                )
                last = session.scalar(
                    select(func.max(Instance.received_at)).join(Series).where(Series.study_id == study.id)
                )
                assert stored is not None and last is not None and study.completed_at is not None
                return (stored - last).total_seconds(), (stored - study.completed_at).total_seconds()
        time.sleep(0.2)
    raise TimeoutError(f"study {study_uid} not delivered within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0)
    args = parser.parse_args(argv)
    cases = {"CR chest (1 instance)": [CHEST], "MR T1 (176 slices)": sorted(SIEMENS.glob("*.dcm"))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with orthanc(work) as pacs, node(work, pacs.port, args.quiet) as (port, url):
            db = Database(url, upgrade=False)
            time.sleep(5)  # let the embedded worker load both detectors (kept warm afterwards)
            for name, files in cases.items():
                received, complete = [], []
                for run in range(args.repeat):
                    copies = renamed_copy(files, work / f"{name[:2]}-{run}")
                    study_uid = str(dcmread(copies[0], stop_before_pixels=True).StudyInstanceUID)
                    send(port, copies)
                    to_stored, after_complete = wait_delivered(db, study_uid)
                    received.append(to_stored - args.quiet)
                    complete.append(after_complete)
                rows.append((name, statistics.median(received), max(received), statistics.median(complete)))
            db.dispose()
    print(f"{'study':24} {'received→stored (s, quiet excluded) median':>44} {'max':>6} {'complete→stored median':>24}")
    for name, median, worst, complete_median in rows:
        print(f"{name:24} {median:44.2f} {worst:6.2f} {complete_median:24.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
