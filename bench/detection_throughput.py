"""Detection throughput per CPU worker (issue 22): ``python -m bench.detection_throughput``.

``--series mr10,mr176,cr --concurrency 1,2 [--jobs 4] [--torch-threads N]``

For each series and each concurrency (pool processes of one ``dicom-node worker --device cpu``) it starts a real
worker on a private ``redis-server``, lets every pool process run one warm-up job, then queues ``--jobs`` jobs at
once (a backlog, as after a burst of studies) and times them:

* jobs/hour = jobs / (last ``finished_at`` - the moment the backlog was queued) x 3600, for the worker and per
  pool process;
* s per job = mean ``finished_at - started_at`` (read the spool, decode, score, save the SeriesResult, record);
* the model stays loaded: the worker's log must show exactly one ``detector ... loaded`` per pool process (at its
  start, before any job) and the jobs must have run in those same processes; the run stops with an error otherwise.

Series (the shipped detectors, model versions from their model cards):

* ``mr176``: the 176-slice Siemens T1 of ../shared/data/dicom/mr_brain_t1_siemens (sagittal; the brain detector
  reformats it to axial);
* ``mr10``: 10 slices of it, every 17th (a thick-slice series across the whole head, same geometry);
* ``cr``: the Philips CR chest PA (1955x1841, JPEG 2000) of ../shared/data/dicom/cr.

Each job is a new study (new UIDs in the job database) pointing at the shared files, so no result is reused.
``--torch-threads N`` runs the worker with ``OMP_NUM_THREADS=N`` (torch's intra-op threads per pool process); by
default the worker chooses (docs/workers.md). ``--batch-size N`` sets ``detectors.<name>.batch_size``. Print the
machine's load average with the figures: the machine is shared. The figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.workers import DICOM, job_side, make_study, start_redis, wait
from dicom_node.db import Database, Job
from dicom_node.timeutil import utc

MR = sorted((DICOM / "mr_brain_t1_siemens").glob("*.dcm"))
SERIES: dict[str, tuple[str, list[Path]]] = {
    "mr176": ("brain_mri", MR),
    "mr10": ("brain_mri", MR[::17][:10]),
    "cr": ("chest_xray", [DICOM / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"]),
}
LOADED = re.compile(r"detector (\w+) loaded on (\S+)")
BATCH = re.compile(r"detector \w+ loaded on \S+ \(model [^,]+, batch (\d+)\)")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _finished(db: Database, job_ids: list[int]) -> list[Job] | None:
    jobs = [_job(db, job_id) for job_id in job_ids]
    for job in jobs:
        if job.state.value not in ("queued", "running", "succeeded"):
            raise SystemExit(f"job {job.id} {job.state.value}: {job.error}")
    return jobs if all(job.state.value == "succeeded" for job in jobs) else None


def run(
    series: str, concurrency: int, jobs: int, workdir: Path, torch_threads: int | None, batch_size: int | None
) -> dict[str, Any]:
    detector, files = SERIES[series]
    redis, url = start_redis()
    config: dict[str, Any] = {
        "node": {"data_dir": str(workdir / "data")},
        "broker": {"url": url},
        "logging": {"level": "INFO"},
        "detectors": {detector: {"soft_time_limit_seconds": 1800, "time_limit_seconds": 2000}},
    }
    if batch_size:
        config["detectors"][detector]["batch_size"] = batch_size
    side = job_side(workdir, config)
    db, scheduler, config_path = side.db, side.scheduler, side.config_path
    env = dict(os.environ)
    if torch_threads:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    log = workdir / "worker.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "dicom-node"), "worker", "--config", str(config_path), "--queues",
             detector, "--device", "cpu", "--concurrency", str(concurrency), "--hostname", f"bench-{series}@%h",
             "--loglevel", "INFO"],
            env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait(lambda: "ready." in log.read_text(errors="replace") or worker.poll() is not None, 300, "the worker", 0.2)
        if worker.poll() is not None:
            raise SystemExit(log.read_text(errors="replace")[-3000:])
        # Warm-up: one job per pool process (the detectors are loaded at process start; the first call warms up).
        warm = [
            job_id
            for _ in range(concurrency)
            for job_id in scheduler.on_study_complete(make_study(db, files, detector))
        ]
        wait(lambda: _finished(db, warm), 1800, "the warm-up jobs", 0.2)
        study_ids = [make_study(db, files, detector) for _ in range(jobs)]
        queued = datetime.now(UTC)
        job_ids = [job_id for study_id in study_ids for job_id in scheduler.on_study_complete(study_id)]
        done = wait(lambda: _finished(db, job_ids), 7200, "the backlog", 0.2)
    finally:
        worker.terminate()
        worker.wait(120)
        redis.kill()
        redis.wait()
        side.close()
    output = log.read_text(errors="replace")
    loads = LOADED.findall(output)
    processes = {job.worker for job in done}
    warm_processes = {_job_worker(output, job_id) for job_id in warm} - {None}
    if len(loads) != concurrency or len(processes) > concurrency:
        raise SystemExit(
            f"the model was not kept loaded: {len(loads)} loads for {concurrency} pool processes, jobs ran in "
            f"{len(processes)} processes"
        )
    makespan = max((utc(job.finished_at) - queued).total_seconds() for job in done if job.finished_at)
    runs = [(utc(job.finished_at) - utc(job.started_at)).total_seconds() for job in done]
    threads = re.findall(r"torch threads (\d+)", output)
    batches = BATCH.findall(output)
    return {
        "series": series,
        "detector": detector,
        "images": len(files),
        "concurrency": concurrency,
        "jobs": jobs,
        "makespan_s": makespan,
        "jobs_per_hour": jobs / makespan * 3600,
        "per_process": jobs / makespan * 3600 / concurrency,
        "run_mean_s": statistics.mean(runs),
        "run_min_s": min(runs),
        "run_max_s": max(runs),
        "loads": len(loads),
        "processes": len(processes | warm_processes),
        "torch_threads": threads[0] if threads else (str(torch_threads) if torch_threads else "default"),
        "batch": batches[0] if batches else str(batch_size or "default"),
    }


def _job_worker(output: str, job_id: int) -> str | None:
    found = re.search(rf"job {job_id}: attempt \d+ on (\S+),", output)
    return found.group(1) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="mr10,mr176,cr", help="comma-separated: " + ",".join(SERIES))
    parser.add_argument("--concurrency", default="1,2", help="pool processes to try, comma-separated")
    parser.add_argument("--jobs", type=int, default=4, help="jobs in the timed backlog (per series/concurrency)")
    parser.add_argument("--cr-jobs", type=int, default=20, help="jobs in the timed backlog for cr")
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for the worker")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="detectors.<name>.batch_size (on CPU at most CPU_MAX_BATCH)"
    )
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {load_average()}")
    for series in args.series.split(","):
        for concurrency in [int(value) for value in args.concurrency.split(",")]:
            jobs = args.cr_jobs if series == "cr" else args.jobs
            before = load_average()
            start = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=f"bench-throughput-{series}-") as tmp:
                result = run(series, concurrency, jobs, Path(tmp), args.torch_threads, args.batch_size)
            print(
                f"{series:6s} ({result['detector']}, {result['images']} images) concurrency {concurrency}: "
                f"{result['jobs_per_hour']:.0f} jobs/hour ({result['per_process']:.0f} per pool process); "
                f"{result['jobs']} jobs in {result['makespan_s']:.1f} s, run {result['run_mean_s']:.2f} s mean "
                f"[{result['run_min_s']:.2f}-{result['run_max_s']:.2f}]; model loaded {result['loads']}x in "
                f"{result['processes']} process(es); torch threads {result['torch_threads']}, batch "
                f"{result['batch']}; load average before "
                f"{before}, after {load_average()} ({time.monotonic() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
