"""Real worker processes on a real Redis (private server) and on the embedded broker.

Nothing lost, nothing done twice: a worker killed mid-job, Redis restarted mid-stream, two workers sharing a
queue, a detector that raises, a job over its time limit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from orthanc_server import Orthanc, running_orthanc
from sqlalchemy import func, select
from worker_harness import Node, RedisServer, wait_for
from workers_support import make_study

from dicom_node.db import DeliveryAttempt, ResultObject
from dicom_node.models.base import SeriesResult

pytestmark = [pytest.mark.slow, pytest.mark.redis]

DONE = {"succeeded", "failed"}


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
    # The worker's main process saw its pool process die and re-queued the job at once.
    assert events == ["created", "started", "worker_lost", "started", "succeeded"]
    assert worker.process.poll() is None  # the worker itself lives on


def destination(orthanc: Orthanc) -> dict[str, object]:
    return {
        "name": "orthanc",
        "ae_title": orthanc.ae_title,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "profile": {"objects": ["SEG", "SR"]},
        "backoff_initial_seconds": 0.5,
    }


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(tmp_path / "orthanc")


def stored_once(node: Node, orthanc: Orthanc, job_ids: list[int]) -> None:
    """Each job delivered with one stored attempt, and the PACS holds exactly the result objects of these jobs
    (no second result set)."""
    with node.db.session() as session:
        stored = session.execute(
            select(DeliveryAttempt.job_id, func.count())
            .where(DeliveryAttempt.outcome.in_(["stored", "warning"]))
            .group_by(DeliveryAttempt.job_id)
        ).all()
        objects = session.execute(select(ResultObject.job_id, ResultObject.sop_instance_uid)).all()
    assert dict(stored) == dict.fromkeys(job_ids, 1)
    assert {job_id for job_id, _ in objects} == set(job_ids)
    in_pacs = {orthanc.tags(instance)["SOPInstanceUID"] for instance in orthanc.instances()}
    assert in_pacs == {uid for _, uid in objects}


def no_unacked(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    wait_for(lambda: client.hlen("unacked") == 0, 15, "no unacknowledged message left in Redis")
    client.close()


WORKER_QUEUES = "brain_mri,delivery"
# For the figures in docs/benchmarks.md: DN_TEST_DEFAULT_TIMINGS=1 runs the failover and Redis tests with the
# shipped heartbeat, grace, sweep and requeue settings instead of the short test ones.
DEFAULT_TIMINGS = (
    {"heartbeat_seconds": 5, "failover_grace_seconds": 30, "sweep_interval_seconds": 5, "requeue_after_seconds": 60}
    if os.environ.get("DN_TEST_DEFAULT_TIMINGS")
    else {}
)
BURST = int(os.environ.get("DN_TEST_BURST", "6"))


@pytest.mark.postgres
def test_failover_in_seconds_whichever_worker_gets_the_message(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer, orthanc: Orthanc
) -> None:
    """Two workers on PostgreSQL and Redis, results to Orthanc. kill -9 of the pool process running a job, then of
    the whole worker running the next one: each job's results are stored once, in seconds, not after the lease."""
    node = make_node(
        tmp_path, postgres_url, redis_server.url, destinations=[destination(orthanc)], lease_seconds=600,
        **DEFAULT_TIMINGS,
    )  # fmt: skip
    try:
        node.start_worker("w1@hostA", queues=WORKER_QUEUES, wait=False)
        node.start_worker("w2@hostB", queues=WORKER_QUEUES)
        wait_for(lambda: "ready." in node.workers[0].output(), 90, "worker w1")
        by_name = {worker.hostname: worker for worker in node.workers}

        (first,), (first_series,) = schedule(node, 1, sleep=3)
        (pid,) = wait_for(lambda: node.started(first_series), 60, "the first job to start")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        node.wait_states([first], {"delivered"}, 60, sweep=True)
        pool_failover = time.monotonic() - killed
        assert node.events(first)[:3] == ["created", "started", "worker_lost"]

        (second,), (second_series,) = schedule(node, 1, sleep=3)
        wait_for(lambda: node.started(second_series), 60, "the second job to start")
        holder = (node.job(second).worker or "").split("#")[0]
        wait_for(lambda: node.heartbeat_holding(holder, second), 15, "the holder's heartbeat to list the job")
        by_name[holder].kill()  # main process and pool: its message stays unacknowledged in Redis
        killed = time.monotonic()
        (job,) = node.wait_states([second], {"delivered"}, 60, sweep=True)
        worker_failover = time.monotonic() - killed
        assert job.attempts == 2 and not (job.worker or "").startswith(holder + "#")
        events = node.events(second)
        assert events[:3] == ["created", "started", "worker_lost"], events
        detail = node.event_details(second)[2]
        assert f"worker {holder} stopped beating" in detail and "time limit" not in detail

        stored_once(node, orthanc, [first, second])
        no_unacked(redis_server)
        print(f"FIGURES failover: pool process kill -9 -> stored {pool_failover:.1f} s; "
              f"whole worker kill -9 -> stored {worker_failover:.1f} s")  # fmt: skip
        assert pool_failover < 60 and worker_failover < 60
    finally:
        node.close()


def test_deliveries_are_not_held_back_by_a_burst(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, orthanc: Orthanc
) -> None:
    """One worker process, a burst of detections: each finished detection's delivery goes before the backlog."""
    node = make_node(tmp_path, sqlite_url, redis_server.url, destinations=[destination(orthanc)])
    try:
        node.start_worker("burst@test", queues=WORKER_QUEUES)
        job_ids, _ = schedule(node, BURST, sleep=0.5)
        jobs = node.wait_states(job_ids, {"delivered"}, 120)
        starts = sorted(job.started_at for job in jobs if job.started_at)
        first_delivered = min(job.delivered_at for job in jobs if job.delivered_at)
        assert first_delivered < starts[2], (first_delivered, starts)  # not after the last detection
        complete = min(job.study_completed_at for job in jobs if job.study_completed_at)
        print(f"FIGURES burst of {len(jobs)}: first delivery {(first_delivered - complete).total_seconds():.1f} s "
              f"after completion; last detection started {(starts[-1] - complete).total_seconds():.1f} s")  # fmt: skip
        stored_once(node, orthanc, job_ids)
    finally:
        node.close()


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
        # The worker's main process re-queues the job the moment the pool kills it, saying why (not the lease).
        assert len(node.started(series_uid)) == 2 and node.events(stuck) == [
            "created", "started", "time_limit", "started", "failed"
        ]  # fmt: skip
        assert worker.process.poll() is None
    finally:
        node.close()


REDIS_DOWN_SECONDS = float(os.environ.get("DN_TEST_REDIS_DOWN_SECONDS", "8"))  # the figure: 30


def test_redis_restarted_mid_stream_loses_nothing(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, orthanc: Orthanc
) -> None:
    """Redis stopped (nothing persisted) with jobs running, queued and scheduled meanwhile: all delivered once,
    within 60 s of its return."""
    node = make_node(tmp_path, sqlite_url, redis_server.url, destinations=[destination(orthanc)], **DEFAULT_TIMINGS)
    try:
        node.start_worker("restart@test", queues=WORKER_QUEUES)
        first, _ = schedule(node, 4, sleep=1.0)
        wait_for(lambda: any(job.state.value != "queued" for job in node.jobs()), 60, "the first job to start")
        redis_server.stop()  # queued messages are gone with it (no persistence)
        during, _ = schedule(node, 2)  # the broker is down: these stay queued in the database
        down_until = time.monotonic() + REDIS_DOWN_SECONDS
        while time.monotonic() < down_until:
            node.sweeper.sweep_once()  # the node's sweeper keeps running; it decides nothing without the broker
            time.sleep(0.5)
        redis_server.start()
        back = time.monotonic()
        jobs = node.wait_states(first + during, {"delivered"}, 60, sweep=True)
        recovered = time.monotonic() - back
        assert [(job.state.value, job.error) for job in jobs] == [("delivered", None)] * 6
        assert len(node.result_dirs()) == 6
        for job in jobs:
            assert node.events(job.id).count("succeeded") == 1
        stored_once(node, orthanc, first + during)
        no_unacked(redis_server)
        print(f"FIGURES Redis down {REDIS_DOWN_SECONDS:g} s: all 6 delivered {recovered:.1f} s after its return")
        assert recovered < 60
    finally:
        node.close()


def test_long_queue_is_not_resent(tmp_path: Path, sqlite_url: str, redis_server: RedisServer) -> None:
    """Jobs merely waiting behind slow ones are never sent twice, however long they wait."""
    node = make_node(tmp_path, sqlite_url, redis_server.url, requeue_after_seconds=1)
    try:
        node.start_worker("queue@test")
        job_ids, _ = schedule(node, 4, sleep=2.0)
        jobs = node.wait_states(job_ids, DONE, 90, sweep=True)
        assert all(job.state.value == "succeeded" for job in jobs)
        assert not any("resend" in node.events(job_id) for job_id in job_ids)
    finally:
        node.close()


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
