"""Admin API latency with a large job database: ``python -m bench.admin [--jobs 10000] [--postgres]``.

Fills a fresh job database (SQLite in a temp dir, or a fresh database on the PostgreSQL server at 127.0.0.1:5432)
with N studies, each with one series and one job in a realistic mix of states, serves the admin API with uvicorn on
a loopback port (the same ``HttpService`` as ``dicom-node serve``) and times HTTP requests with one client:
p50/p95 per request kind. Results go to docs/benchmarks.md by hand, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text

from dicom_node.admin.service import HttpService
from dicom_node.config import load_settings
from dicom_node.db import Database, Job, JobState, Series, Study, StudyState

TOKEN = "bench"
POSTGRES_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

STATE_MIX = [
    (JobState.DELIVERED, 0.86),
    (JobState.FAILED, 0.03),
    (JobState.DELIVERY_FAILED, 0.02),
    (JobState.QUEUED, 0.05),
    (JobState.RUNNING, 0.02),
    (JobState.SUCCEEDED, 0.02),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fill(db: Database, n_jobs: int, seed: int = 7) -> None:
    """N studies / series / jobs over the last 7 days, bulk-inserted."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    states, weights = zip(*STATE_MIX, strict=True)
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    for i in range(1, n_jobs + 1):
        chest = rng.random() < 0.6
        received = now - timedelta(seconds=rng.uniform(0, 7 * 86400))
        completed = received + timedelta(seconds=30)
        state = rng.choices(states, weights)[0]
        queued = completed + timedelta(seconds=0.05)
        started = queued + timedelta(seconds=rng.uniform(0.05, 2)) if state != JobState.QUEUED else None
        finished = (
            started + timedelta(seconds=rng.uniform(0.8, 2) if chest else rng.uniform(8, 25))
            if started and state != JobState.RUNNING
            else None
        )
        scored = finished is not None and state != JobState.FAILED
        score = rng.random() if scored else None
        studies.append(
            {
                "id": i,
                "study_instance_uid": f"1.2.826.0.1.3680043.8.498.1.{i}",
                "accession_number": f"A{i:08d}",
                "modalities": "CR" if chest else "MR",
                "calling_ae_title": rng.choice(["CR_ROOM1", "CR_ROOM2", "DX_ER", "MRSCANNER1", "MRSCANNER2"]),
                "state": StudyState.COMPLETE,
                "first_received_at": received,
                "last_received_at": received,
                "completed_at": completed,
                "completion_reason": "quiet for 30 s",
                "completion_count": 1,
                "needs_reprocessing": False,
                "instance_count": 1 if chest else 176,
            }
        )
        series.append(
            {
                "id": i,
                "study_id": i,
                "series_instance_uid": f"1.2.826.0.1.3680043.8.498.2.{i}",
                "modality": "CR" if chest else "MR",
                "instance_count": 1 if chest else 176,
                "detector": "chest_xray" if chest else "brain_mri",
                "routing_rule": "frontal-chest" if chest else "brain-mr",
                "routed_at": completed,
            }
        )
        jobs.append(
            {
                "id": i,
                "study_id": i,
                "series_id": i,
                "detector": "chest_xray" if chest else "brain_mri",
                "model_version": "1.0.0",
                "instance_set_hash": f"{i:064x}",
                "result_key": f"{i:064x}",
                "state": state,
                "priority": 5,
                "urgent": False,
                "attempts": 1 if started else 0,
                "error": "DetectorError: bench" if state == JobState.FAILED else None,
                "study_completed_at": completed,
                "created_at": queued,
                "queued_at": queued,
                "started_at": started,
                "finished_at": finished,
                "delivered_at": finished + timedelta(seconds=0.5) if finished and state == JobState.DELIVERED else None,
                "series_score": score,
                "image_threshold": 0.6 if scored else None,
                "is_abnormal": (score > 0.6) if score is not None else None,
            }
        )
    with db.session() as session:
        for model, rows in ((Study, studies), (Series, series), (Job, jobs)):
            for start in range(0, len(rows), 2000):
                session.execute(insert(model), rows[start : start + 2000])
    if db.engine.dialect.name == "postgresql":
        with db.engine.begin() as connection:
            for table in ("studies", "series", "jobs"):
                connection.execute(text(f"SELECT setval('{table}_id_seq', {n_jobs})"))
                connection.execute(text(f"ANALYZE {table}"))


REQUESTS = [
    ("jobs list (limit 50)", "/api/jobs?limit=50"),
    ("jobs, state=failed", "/api/jobs?state=failed&limit=50"),
    ("jobs, chest abnormal last 24h", "/api/jobs?detector=chest_xray&abnormal=true&since=24h&limit=50"),
    ("jobs, offset 5000", "/api/jobs?limit=50&offset=5000"),
    ("studies, triage order", "/api/studies?order=triage&limit=50"),
    ("job timeline", "/api/jobs/{job}/timeline"),
    ("stats 24h", "/api/stats?since=24h"),
    ("metrics", "/metrics"),
]


def measure(url: str, n_jobs: int, repeats: int) -> list[tuple[str, float, float]]:
    rng = random.Random(1)
    results = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        for name, path in REQUESTS:
            client.get(path.format(job=1)).raise_for_status()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                client.get(path.format(job=rng.randint(1, n_jobs))).raise_for_status()
                times.append(time.perf_counter() - start)
            times.sort()
            results.append((name, statistics.median(times) * 1000, times[int(0.95 * (len(times) - 1))] * 1000))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg_name = None
        if args.postgres:
            pg_name = f"dn_bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
            url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{pg_name}"
        else:
            url = f"sqlite:///{Path(tmp) / 'jobs.sqlite'}"
        try:
            db = Database(url)
            start = time.perf_counter()
            fill(db, args.jobs)
            print(f"filled {args.jobs} jobs in {time.perf_counter() - start:.1f} s ({db.engine.dialect.name})")
            settings = load_settings(
                overrides={
                    "node": {"data_dir": tmp},
                    "database": {"url": url},
                    "http": {"port": free_port(), "read_tokens": [TOKEN]},
                }
            )
            service = HttpService(settings, db)
            service.start()
            try:
                print(f"{'request':34} {'p50 ms':>8} {'p95 ms':>8}")
                for name, p50, p95 in measure(service.url, args.jobs, args.repeats):
                    print(f"{name:34} {p50:8.1f} {p95:8.1f}")
            finally:
                service.stop()
                db.dispose()
        finally:
            if pg_name:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
                admin.dispose()


if __name__ == "__main__":
    main()
