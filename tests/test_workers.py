"""Real worker processes on a real Redis (private server) and on the embedded broker.

Nothing lost, nothing done twice: a worker killed mid-job, Redis restarted mid-stream, two workers sharing a
queue, a detector that raises, a job over its time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_harness import Node, RedisServer, wait_for
from workers_support import make_study

from models.base import SeriesResult

pytestmark = [pytest.mark.slow, pytest.mark.redis]

DONE = {"succeeded", "failed"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; make test-deps installs it)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def make_node(tmp_path: Path, database_url: str, broker_url: str | None, **workers: object) -> Node:
    return Node(tmp_path, database_url, broker_url, **workers)


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str, redis_server: RedisServer) -> Iterator[Node]:
    node = make_node(tmp_path, sqlite_url, redis_server.url)
    yield node
    node.close()


def schedule(
    node: Node, count: int, calling_ae_title: str = "MODALITY", **behaviour: object
) -> tuple[list[int], list[str]]:
    job_ids, series = [], []
    for index in range(count):
        directory = node.tmp_path / "spool" / f"study-{time.monotonic_ns()}-{index}"
        made = make_study(node.db, directory, slices=3, calling_ae_title=calling_ae_title)
        if behaviour:
            node.set_behaviour(made.series_uid, **behaviour)
        job_ids += node.scheduler.on_study_complete(made.study_id)
        series.append(made.series_uid)
    return job_ids, series


def assert_result(node: Node, job_id: int) -> None:
    job = node.job(job_id)
    assert job.result_path is not None
    result = SeriesResult.load(Path(job.result_path))
    assert len(result.sop_instance_uids) == 3 and result.anomaly_maps.shape[0] == 3
    assert job.series_score == pytest.approx(result.series_score)


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_workers_share_a_queue(
    tmp_path: Path, database: str, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "postgres_url")
    node = make_node(tmp_path, url, redis_server.url)
    try:
        node.start_worker("alpha@test", wait=False)
        node.start_worker("beta@test")
        wait_for(lambda: "ready." in node.workers[0].output(), 90, "worker alpha")
        job_ids, _ = schedule(node, 6, sleep=0.7)
        jobs = node.wait_states(job_ids, DONE, 120)
        assert [job.state.value for job in jobs] == ["succeeded"] * 6
        assert all(job.attempts == 1 for job in jobs)
        hosts = {job.worker.split("#")[0] for job in jobs if job.worker}
        assert hosts == {"alpha@test", "beta@test"}
        assert len(node.result_dirs()) == 6
        for job_id in job_ids:
            assert_result(node, job_id)
    finally:
        node.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db_node(tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Node]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    node = make_node(tmp_path, url, redis_server.url)
    yield node
    node.close()


def test_worker_killed_mid_job_completes_exactly_once(any_db_node: Node) -> None:
    node = any_db_node
    worker = node.start_worker("kill@test")
    (job_id,), (series_uid,) = schedule(node, 1, sleep=2.5)
    (pid,) = wait_for(lambda: node.started(series_uid), 60, "the job to start")
    os.kill(pid, signal.SIGKILL)  # the pool process running the detector
    (job,) = node.wait_states([job_id], DONE, 90, sweep=True)
    assert job.state.value == "succeeded" and job.attempts == 2
    assert len(node.started(series_uid)) == 2
    assert node.result_dirs() == [node.settings.results_dir / f"job-{job_id}"]
    assert_result(node, job_id)
    events = node.events(job_id)
    assert events.count("succeeded") == 1 and ("taken_over" in events or "lease_expired" in events)
    assert worker.process.poll() is None  # the worker itself lives on


def test_whole_worker_killed_another_takes_over(node: Node) -> None:
    first = node.start_worker("doomed@test")
    (job_id,), (series_uid,) = schedule(node, 1, sleep=2.5)
    wait_for(lambda: node.started(series_uid), 60, "the job to start")
    first.kill()  # main process and pool: the message stays unacknowledged in Redis
    node.start_worker("rescuer@test")
    (job,) = node.wait_states([job_id], DONE, 90, sweep=True)  # the sweeper re-queues after the lease expires
    assert job.state.value == "succeeded" and job.attempts == 2 and job.worker.startswith("rescuer@test#")
    assert node.result_dirs() == [node.settings.results_dir / f"job-{job_id}"]
    assert node.events(job_id).count("succeeded") == 1


def test_detector_error_fails_job_and_worker_lives_on(node: Node) -> None:
    node.start_worker("errors@test")
    (bad,), _ = schedule(node, 1, **{"raise": "no brain in this series"})
    (good,), _ = schedule(node, 1)
    bad_job, good_job = node.wait_states([bad, good], DONE, 90)
    assert bad_job.state.value == "failed" and bad_job.attempts == 1
    assert bad_job.error == "DetectorError: no brain in this series"
    assert good_job.state.value == "succeeded" and good_job.worker.startswith("errors@test#")
    assert_result(node, good)


def test_time_limit_fails_job(tmp_path: Path, sqlite_url: str, redis_server: RedisServer) -> None:
    node = make_node(tmp_path, sqlite_url, redis_server.url, soft_time_limit_seconds=2, time_limit_seconds=20)
    try:
        node.start_worker("slow@test")
        (slow,), _ = schedule(node, 1, sleep=30)
        (after,), _ = schedule(node, 1)
        slow_job, after_job = node.wait_states([slow, after], DONE, 90)
        assert slow_job.state.value == "failed" and "time limit" in (slow_job.error or "")
        assert after_job.state.value == "succeeded"
    finally:
        node.close()


def test_hard_time_limit_kills_and_fails_after_max_attempts(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer
) -> None:
    # The detector ignores the soft limit (stuck in native code): the pool kills the process at the hard limit.
    node = make_node(
        tmp_path, sqlite_url, redis_server.url, soft_time_limit_seconds=1, time_limit_seconds=3, max_attempts=2
    )
    try:
        worker = node.start_worker("hard@test")
        (stuck,), (series_uid,) = schedule(node, 1, sleep=30, ignore_soft_limit=True)
        (job,) = node.wait_states([stuck], DONE, 120, sweep=True)
        assert job.state.value == "failed" and job.attempts == 2
        assert (job.error or "").startswith("time limit: ") and "gave up after 2 attempts" in (job.error or "")
        assert len(node.started(series_uid)) == 2 and "lease_expired" in node.events(stuck)
        assert worker.process.poll() is None
    finally:
        node.close()


def test_redis_restarted_mid_stream_loses_nothing(node: Node, redis_server: RedisServer) -> None:
    node.start_worker("restart@test")
    first, _ = schedule(node, 4, sleep=1.0)
    wait_for(lambda: any(job.state.value != "queued" for job in node.jobs()), 60, "the first job to start")
    redis_server.stop()  # queued messages are gone with it (no persistence)
    during, _ = schedule(node, 2)  # the broker is down: these stay queued in the database
    time.sleep(1)
    redis_server.start()
    jobs = node.wait_states(first + during, DONE, 150, sweep=True)
    assert [(job.state.value, job.error) for job in jobs] == [("succeeded", None)] * 6, [
        (node.events(job.id), node.workers[0].output()[-5000:]) for job in jobs if job.state.value != "succeeded"
    ]
    assert len(node.result_dirs()) == 6
    for job in jobs:
        assert node.events(job.id).count("succeeded") == 1


def test_urgent_job_overtakes_the_backlog(tmp_path: Path, sqlite_url: str, redis_server: RedisServer) -> None:
    urgent_rules = [{"name": "emergency", "calling_ae_title": ["ER_CT"]}]
    node = make_node(tmp_path, sqlite_url, redis_server.url, urgent_rules=urgent_rules)
    try:
        node.start_worker("triage@test")
        (busy,), (busy_series,) = schedule(node, 1, sleep=2.0)
        wait_for(lambda: node.started(busy_series), 60, "the first job to start")
        backlog, _ = schedule(node, 3)
        (urgent,), _ = schedule(node, 1, calling_ae_title="ER_CT")
        jobs = node.wait_states([busy, *backlog, urgent], DONE, 90)
        assert all(job.state.value == "succeeded" for job in jobs)
        order = [job.id for job in sorted(jobs, key=lambda job: job.started_at)]
        assert order[:2] == [busy, urgent], order
    finally:
        node.close()


def test_embedded_broker_end_to_end(tmp_path: Path, sqlite_url: str) -> None:
    node = make_node(tmp_path, sqlite_url, None)
    try:
        assert node.app.conf.broker_url.startswith("sqlite:")
        node.start_worker("embedded@test", concurrency=2)
        job_ids, _ = schedule(node, 3)
        jobs = node.wait_states(job_ids, DONE, 90)
        assert [job.state.value for job in jobs] == ["succeeded"] * 3
        for job_id in job_ids:
            assert_result(node, job_id)
    finally:
        node.close()
