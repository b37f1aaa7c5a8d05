"""Admin REST API against a real job database (SQLite and PostgreSQL): filters, paging, tokens, timeline, stats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_rows import DELIVERY_ERROR, DETECTION_ERROR, Rows, fill
from fastapi.testclient import TestClient

from dicom_node.admin.actions import ActionError
from dicom_node.admin.api import create_app
from dicom_node.config import load_settings
from dicom_node.db import Database, Job, JobState

READ = "read-token-for-tests"
ADMIN = "admin-token-for-tests"


def _settings(tmp_path: Path, url: str, **http: object):  # type: ignore[no-untyped-def]
    return load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path)},
            "database": {"url": url},
            "http": {"read_tokens": [READ], "admin_tokens": [ADMIN], **http},
        }
    )


class RecordingActions:
    """Actions that change the database the way the state machine does, recording each call."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls: list[tuple[str, object]] = []

    def retry_job(self, job_id: int) -> list[int]:
        self.calls.append(("retry", job_id))
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} not found")
            if job.state not in (JobState.FAILED, JobState.DELIVERY_FAILED):
                raise ActionError(f"job {job_id} is {job.state.value}, not failed")
            job.state = JobState.QUEUED
        return [job_id]

    def rerun_study(self, study_instance_uid: str) -> list[int]:
        self.calls.append(("rerun", study_instance_uid))
        return []

    def redeliver_job(self, job_id: int) -> list[int]:
        self.calls.append(("redeliver", job_id))
        return [job_id]


@pytest.fixture
def filled(database: Database) -> Rows:
    return fill(database)


@pytest.fixture
def client(tmp_path: Path, database: Database, filled: Rows) -> Iterator[TestClient]:
    app = create_app(_settings(tmp_path, database.url), database, RecordingActions(database))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {READ}"
        yield c


def test_health_needs_no_token(tmp_path: Path, database: Database) -> None:
    app = create_app(_settings(tmp_path, database.url), database)
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "broker": "not configured (embedded)"}


def test_readiness_reports_unreachable_broker(tmp_path: Path, database: Database) -> None:
    from conftest import free_port

    settings = _settings(tmp_path, database.url).model_copy(deep=True)
    settings.broker.url = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(settings, database)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["broker"].startswith("error: ConnectionError")


@pytest.mark.redis
def test_readiness_with_real_redis(tmp_path: Path, database: Database) -> None:
    from conftest import port_open

    if not port_open(6379):
        pytest.skip("Redis is not listening on 127.0.0.1:6379")
    settings = _settings(tmp_path, database.url).model_copy(deep=True)
    settings.broker.url = "redis://127.0.0.1:6379/0"
    with TestClient(create_app(settings, database)) as c:
        assert c.get("/readyz").json()["checks"]["broker"] == "ok"


def test_tokens_refused(client: TestClient, filled: Rows) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {READ}"}):
        response = client.get("/api/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    # A read token reads but may not act.
    job_id = filled.jobs["brain_failed"]
    assert client.get(f"/api/jobs/{job_id}").status_code == 200
    refused = client.post(f"/api/jobs/{job_id}/retry")
    assert refused.status_code == 403
    assert "admin token" in refused.json()["detail"]
    assert client.post(f"/api/jobs/{job_id}/retry", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_openapi_and_docs_published(client: TestClient) -> None:
    spec = client.get("/openapi.json", headers={"Authorization": ""}).json()
    for path in ("/api/jobs", "/api/jobs/{job_id}/timeline", "/api/studies", "/api/jobs/{job_id}/retry", "/metrics"):
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = client.get("/docs", headers={"Authorization": ""})
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text and "https://" not in docs.text  # nothing fetched from outside the node
    assert client.get("/docs-assets/swagger-ui-bundle.js", headers={"Authorization": ""}).status_code == 200
    assert client.get("/redoc", headers={"Authorization": ""}).status_code == 404


def test_jobs_filters(client: TestClient, filled: Rows) -> None:
    everything = client.get("/api/jobs").json()
    assert everything["total"] == 5
    assert [j["id"] for j in everything["items"]] == sorted(filled.jobs.values(), reverse=True)

    failed = client.get("/api/jobs", params={"state": "failed,delivery_failed"}).json()
    assert {j["id"] for j in failed["items"]} == {filled.jobs["brain_failed"], filled.jobs["chest_delivery_failed"]}
    reasons = {j["id"]: j["error"] for j in failed["items"]}
    assert reasons[filled.jobs["brain_failed"]] == DETECTION_ERROR
    assert reasons[filled.jobs["chest_delivery_failed"]] == DELIVERY_ERROR
    repeated = client.get("/api/jobs", params=[("state", "delivered"), ("state", "queued")]).json()
    assert {j["id"] for j in repeated["items"]} == {
        filled.jobs["brain_normal"],
        filled.jobs["chest_abnormal"],
        filled.jobs["chest_queued"],
    }

    chest = client.get("/api/jobs", params={"detector": "chest_xray"}).json()
    assert chest["total"] == 3 and {j["detector"] for j in chest["items"]} == {"chest_xray"}
    abnormal = client.get("/api/jobs", params={"abnormal": "true"}).json()
    assert [j["id"] for j in abnormal["items"]] == [filled.jobs["chest_abnormal"]]
    assert abnormal["items"][0]["series_score"] == pytest.approx(0.93)
    normal = client.get("/api/jobs", params={"abnormal": "false"}).json()
    assert {j["id"] for j in normal["items"]} == {filled.jobs["brain_normal"], filled.jobs["chest_delivery_failed"]}
    by_ae = client.get("/api/jobs", params={"calling_ae": "MRSCANNER1"}).json()
    assert {j["id"] for j in by_ae["items"]} == {filled.jobs["brain_normal"], filled.jobs["brain_failed"]}
    assert all(j["calling_ae_title"] == "MRSCANNER1" for j in by_ae["items"])

    # Time range on the job's creation: the last 100 minutes hold the abnormal CXR, the refused CXR and the queued one.
    recent = client.get("/api/jobs", params={"since": "100m"}).json()
    assert {j["id"] for j in recent["items"]} == {
        filled.jobs["chest_abnormal"],
        filled.jobs["chest_delivery_failed"],
        filled.jobs["chest_queued"],
    }
    until = (filled.now.replace(microsecond=0)).isoformat()
    window = client.get("/api/jobs", params={"since": "150m", "until": until, "detector": "brain_mri"}).json()
    assert [j["id"] for j in window["items"]] == [filled.jobs["brain_failed"]]
    combined = client.get("/api/jobs", params={"state": "delivered", "detector": "chest_xray"}).json()
    assert [j["id"] for j in combined["items"]] == [filled.jobs["chest_abnormal"]]


def test_failed_filter_means_every_failure(client: TestClient, filled: Rows) -> None:
    """``state=failed`` lists the detection failures and the delivery failures; each job's state says which."""
    failures = {filled.jobs["brain_failed"]: "failed", filled.jobs["chest_delivery_failed"]: "delivery_failed"}
    failed = client.get("/api/jobs", params={"state": "failed"}).json()
    assert failed["total"] == 2
    assert {j["id"]: j["state"] for j in failed["items"]} == failures
    with_queued = client.get("/api/jobs", params={"state": "failed,queued"}).json()
    assert {j["id"] for j in with_queued["items"]} == {*failures, filled.jobs["chest_queued"]}
    only_delivery = client.get("/api/jobs", params={"state": "delivery_failed"}).json()
    assert [j["id"] for j in only_delivery["items"]] == [filled.jobs["chest_delivery_failed"]]


def test_out_of_range_parameters_are_422_with_a_message(client: TestClient, filled: Rows) -> None:
    """What an admin typed that the database cannot take: a 422 naming the problem, never a 500."""
    huge = 2**63
    for path in (f"/api/jobs/{huge}", f"/api/jobs/{huge}/timeline", "/api/jobs/0"):
        response = client.get(path)
        assert response.status_code == 422, path
        assert response.json()["detail"][0]["loc"] == ["path", "job_id"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for action in ("retry", "redeliver"):
        assert client.post(f"/api/jobs/{huge}/{action}", headers=admin).status_code == 422
    for path in ("/api/jobs", "/api/studies", "/api/series"):
        assert client.get(path, params={"offset": huge}).status_code == 422, path
        last = client.get(path, params={"offset": huge - 1})
        assert last.status_code == 200 and last.json()["items"] == [], path
    assert client.get("/api/jobs/9223372036854775807").status_code == 404

    for path in ("/api/jobs", "/api/studies", "/api/stats", "/api/stats/throughput"):
        response = client.get(path, params={"since": "99999999999d"})
        assert response.status_code == 422, path
        assert response.json()["detail"] == "'99999999999d' is too long a duration: at most 36500d"
    before_utc = client.get("/api/jobs", params={"until": "0001-01-01T00:00:00+01:00"})
    assert before_utc.status_code == 422 and "out of the range" in before_utc.json()["detail"]
    too_many = client.get("/api/stats/throughput", params={"since": "30d", "bucket": "1m"})
    assert too_many.status_code == 422 and "at most 10000" in too_many.json()["detail"]
    assert (
        client.get("/api/stats/throughput", params={"since": "1h", "bucket": "x"})
        .json()["detail"]
        .startswith("bucket: 'x' is not a duration")
    )


def test_empty_parameters_are_absent(client: TestClient) -> None:
    """``since=`` (a form left empty) is the default period, not an error on the server."""
    default = client.get("/api/stats").json()
    empty = client.get("/api/stats", params={"since": "", "until": ""})
    assert empty.status_code == 200
    assert empty.json()["jobs"] == default["jobs"] == 5
    plot = client.get("/api/stats/throughput", params={"since": "", "bucket": ""})
    assert plot.status_code == 200
    assert len(plot.json()["buckets"]) == 24 and plot.json()["bucket_seconds"] == 3600
    assert client.get("/api/jobs", params={"since": "", "until": "", "state": ""}).json()["total"] == 5


def test_control_characters_in_parameters_are_422(client: TestClient, filled: Rows) -> None:
    """PostgreSQL refuses NUL in text: refused up front, on every database, with the parameter named."""
    response = client.get("/api/jobs", params={"detector": "brain\x00mri"})
    assert (
        response.status_code == 422
        and response.json()["detail"] == "query parameter 'detector' contains a control character"
    )
    assert client.get("/api/series", params={"modality": "MR\n"}).status_code == 422
    assert client.get(f"/api/studies/{filled.studies['brain_normal']}%00").status_code == 422
    # Without a token the answer stays 401, whatever the parameters.
    assert client.get("/api/jobs", params={"detector": "\x00"}, headers={"Authorization": ""}).status_code == 401


def test_bad_filters_are_422(client: TestClient) -> None:
    bad_state = client.get("/api/jobs", params={"state": "exploded"})
    assert bad_state.status_code == 422 and "exploded" in bad_state.json()["detail"]
    assert client.get("/api/jobs", params={"since": "yesterday"}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 1001}).status_code == 422
    assert client.get("/api/studies", params={"order": "random"}).status_code == 422
    assert client.get("/api/jobs/999999").status_code == 404


def test_jobs_paging(client: TestClient, filled: Rows) -> None:
    ids = sorted(filled.jobs.values(), reverse=True)
    pages = [client.get("/api/jobs", params={"limit": 3, "offset": offset}).json() for offset in (0, 3, 6)]
    assert [p["total"] for p in pages] == [5, 5, 5]
    assert [j["id"] for j in pages[0]["items"]] == ids[:3]
    assert [j["id"] for j in pages[1]["items"]] == ids[3:]
    assert pages[2]["items"] == []
    assert (pages[1]["limit"], pages[1]["offset"]) == (3, 3)
    filtered = client.get("/api/jobs", params={"detector": "chest_xray", "limit": 2, "offset": 2}).json()
    assert filtered["total"] == 3 and len(filtered["items"]) == 1


def test_studies_triage_order_and_filters(client: TestClient, filled: Rows) -> None:
    triage = client.get("/api/studies", params={"order": "triage"}).json()
    assert triage["total"] == 6
    first = triage["items"][0]
    assert first["study_instance_uid"] == filled.studies["chest_abnormal"]
    assert first["abnormal"] is True and first["max_score"] == pytest.approx(0.93)
    assert [(j["id"], j["detector"], j["state"], j["is_abnormal"]) for j in first["jobs"]] == [
        (filled.jobs["chest_abnormal"], "chest_xray", "delivered", True)
    ]
    flags = [item["abnormal"] for item in triage["items"]]
    assert flags == [True, None, None, None, False, False]  # abnormal, waiting for a result, normal

    recent = client.get("/api/studies").json()
    assert recent["items"][0]["study_instance_uid"] == filled.studies["receiving"]
    assert recent["items"][0]["state"] == "receiving" and recent["items"][0]["job_count"] == 0
    brain = next(i for i in recent["items"] if i["study_instance_uid"] == filled.studies["brain_normal"])
    assert brain["series_count"] == 2 and brain["instance_count"] == 24
    assert brain["job_states"] == {"delivered": 1}

    assert client.get("/api/studies", params={"state": "receiving"}).json()["total"] == 1
    assert client.get("/api/studies", params={"abnormal": "true"}).json()["total"] == 1
    assert client.get("/api/studies", params={"abnormal": "false"}).json()["total"] == 2
    assert client.get("/api/studies", params={"detector": "brain_mri"}).json()["total"] == 2
    assert client.get("/api/studies", params={"calling_ae": "CR_ROOM2"}).json()["total"] == 2
    assert client.get("/api/studies", params={"since": "10m"}).json()["total"] == 2
    page = client.get("/api/studies", params={"limit": 4, "offset": 4}).json()
    assert page["total"] == 6 and len(page["items"]) == 2


def test_study_detail_and_series(client: TestClient, filled: Rows) -> None:
    detail = client.get(f"/api/studies/{filled.studies['brain_normal']}").json()
    routing = {s["series_description"]: (s["detector"], s["routing_reason"]) for s in detail["series"]}
    assert routing == {"localizer": (None, "localizer"), "t1_mprage_sag": ("brain_mri", None)}
    assert [j["id"] for j in detail["jobs"]] == [filled.jobs["brain_normal"]]
    assert client.get("/api/studies/1.2.3.4.5").status_code == 404

    series = client.get("/api/series", params={"study_uid": filled.studies["brain_normal"]}).json()
    assert series["total"] == 2
    assert client.get("/api/series", params={"detector": "chest_xray"}).json()["total"] == 3
    assert client.get("/api/series", params={"modality": "MR"}).json()["total"] == 4


def test_job_timeline(client: TestClient, filled: Rows) -> None:
    timeline = client.get(f"/api/jobs/{filled.jobs['brain_normal']}/timeline").json()
    names = [step["name"] for step in timeline["steps"]]
    assert names == [
        "received",
        "last_received",
        "complete",
        "queued",
        "started",
        "finished",
        "delivery",
        "delivery",
        "delivered",
    ]
    deliveries = [s["detail"] for s in timeline["steps"] if s["name"] == "delivery"]
    assert deliveries[0].startswith("ORTHANC@127.0.0.1:4242 #1: retry status 0xA700")
    assert deliveries[1] == "ORTHANC@127.0.0.1:4242 #2: stored status 0x0000"
    durations = timeline["durations"]
    assert durations["run"] == pytest.approx(14.0, abs=1e-3)
    assert durations["queue_wait"] == pytest.approx(0.2, abs=1e-3)
    assert durations["delivery"] == pytest.approx(0.3 + 2.5 + 0.8, abs=1e-3)
    assert durations["receive_to_pacs"] > durations["complete_to_result"] > durations["run"]
    assert timeline["steps"][0]["seconds_since_previous"] is None
    assert all(s["seconds_since_previous"] >= 0 for s in timeline["steps"][1:])
    assert timeline["steps"][-1]["seconds_since_first"] == pytest.approx(
        sum(s["seconds_since_previous"] for s in timeline["steps"][1:]), abs=1e-3
    )
    assert [d["outcome"] for d in timeline["deliveries"]] == ["retry", "stored"]
    assert {r["kind"] for r in timeline["results"]} == {"SEG", "SR"}
    assert [e["to_state"] for e in timeline["events"]] == ["queued", "running", "succeeded", "delivered"]

    failed = client.get(f"/api/jobs/{filled.jobs['brain_failed']}/timeline").json()
    finished = next(s for s in failed["steps"] if s["name"] == "finished")
    assert finished["detail"] == f"failed: {DETECTION_ERROR}"
    refused = client.get(f"/api/jobs/{filled.jobs['chest_delivery_failed']}/timeline").json()
    assert refused["steps"][-1]["name"] == "delivery_failed"
    assert refused["steps"][-1]["detail"] == DELIVERY_ERROR
    queued = client.get(f"/api/jobs/{filled.jobs['chest_queued']}/timeline").json()
    assert [s["name"] for s in queued["steps"]] == ["received", "complete", "queued"]
    assert client.get("/api/jobs/424242/timeline").status_code == 404


def test_stats_and_throughput(client: TestClient, filled: Rows) -> None:
    stats = client.get("/api/stats", params={"since": "24h"}).json()
    assert stats["jobs"] == 5 and stats["studies_received"] == 6 and stats["instances_received"] == 34
    per = {d["detector"]: d for d in stats["detectors"]}
    assert per["chest_xray"]["jobs"] == 3 and per["chest_xray"]["with_result"] == 2
    assert per["chest_xray"]["abnormal"] == 1 and per["chest_xray"]["abnormal_rate"] == pytest.approx(0.5)
    assert per["chest_xray"]["failed"] == 1 and per["brain_mri"]["failed"] == 1
    assert per["brain_mri"]["run_p50"] == pytest.approx((14.0 + 0.4) / 2, abs=1e-3)
    assert per["brain_mri"]["latency_p50"] == pytest.approx(0.05 + 0.2 + 14.0 + 0.3 + 2.5 + 0.8, abs=1e-3)
    assert client.get("/api/stats", params={"since": "2m"}).json()["jobs"] == 0

    plot = client.get("/api/stats/throughput", params={"since": "24h", "bucket": "1h"}).json()
    assert len(plot["buckets"]) == 24 and plot["bucket_seconds"] == 3600
    series = {d["detector"]: d for d in plot["detectors"]}
    assert sum(series["chest_xray"]["finished"]) == 2 and sum(series["brain_mri"]["finished"]) == 2
    assert client.get("/api/stats/throughput", params={"bucket": "5s"}).status_code == 422


def test_retry_action(tmp_path: Path, database: Database, filled: Rows) -> None:
    actions = RecordingActions(database)
    with TestClient(create_app(_settings(tmp_path, database.url), database, actions)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        job_id = filled.jobs["brain_failed"]
        done = c.post(f"/api/jobs/{job_id}/retry")
        assert done.status_code == 200 and done.json() == {"action": "retry", "job_ids": [job_id], "detail": None}
        assert c.get(f"/api/jobs/{job_id}").json()["state"] == "queued"
        again = c.post(f"/api/jobs/{job_id}/retry")
        assert again.status_code == 409 and "not failed" in again.json()["detail"]
        assert c.post("/api/jobs/999999/retry").status_code == 404
        assert c.post(f"/api/jobs/{filled.jobs['brain_normal']}/redeliver").json()["job_ids"] == [
            filled.jobs["brain_normal"]
        ]
        assert c.post(f"/api/studies/{filled.studies['brain_normal']}/rerun").status_code == 200
    assert [name for name, _ in actions.calls] == ["retry", "retry", "retry", "redeliver", "rerun"]


def test_actions_unavailable_without_state_machine(tmp_path: Path, database: Database, filled: Rows) -> None:
    with TestClient(create_app(_settings(tmp_path, database.url), database, None)) as c:
        response = c.post(
            f"/api/jobs/{filled.jobs['brain_failed']}/retry", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert response.status_code == 503


def test_actions_through_the_job_state_machine(tmp_path: Path, database: Database, filled: Rows) -> None:
    """retry / redeliver / rerun over HTTP change the job database through dicom_node.jobs and send broker
    messages (recorded by the workers' broker-free dispatcher)."""
    from workers_support import RecordingDispatcher

    from dicom_node.admin.actions import JobActions
    from dicom_node.workers.versions import model_card_versions

    settings = _settings(tmp_path, database.url)
    dispatcher = RecordingDispatcher()
    with TestClient(
        create_app(
            settings, database, JobActions(database, settings, dispatcher, model_version=model_card_versions(settings))
        )
    ) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        failed = filled.jobs["brain_failed"]
        assert c.post(f"/api/jobs/{failed}/retry").json()["job_ids"] == [failed]
        job = c.get(f"/api/jobs/{failed}").json()
        assert job["state"] == "queued" and job["error"] is None
        assert [d[0] for d in dispatcher.detections] == [failed]
        events = c.get(f"/api/jobs/{failed}/timeline").json()["events"]
        assert events[-1]["event"] == "retry" and DETECTION_ERROR in events[-1]["detail"]
        # Not failed any more: a second retry just re-sends the queued job's message.
        assert c.post(f"/api/jobs/{failed}/retry").status_code == 200
        # A delivered job cannot be retried (409 with the state machine's reason), and unknown ids are 404.
        conflict = c.post(f"/api/jobs/{filled.jobs['brain_normal']}/retry")
        assert conflict.status_code == 409 and "delivered" in conflict.json()["detail"]
        assert c.post("/api/jobs/999999/retry").status_code == 404

        # Retrying a delivery failure delivers again.
        refused = filled.jobs["chest_delivery_failed"]
        assert c.post(f"/api/jobs/{refused}/retry").status_code == 200
        assert c.get(f"/api/jobs/{refused}").json()["state"] == "succeeded"
        assert dispatcher.deliveries == [refused]
        assert c.post(f"/api/jobs/{filled.jobs['brain_normal']}/redeliver").status_code == 200
        assert dispatcher.deliveries == [refused, filled.jobs["brain_normal"]]
        assert c.post(f"/api/jobs/{filled.jobs['chest_queued']}/redeliver").status_code == 409

        rerun = c.post(f"/api/studies/{filled.studies['chest_abnormal']}/rerun")
        assert rerun.status_code == 200 and len(rerun.json()["job_ids"]) == 1
        assert c.post("/api/studies/1.2.3.999/rerun").status_code == 404


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own on a free port (the shared one on 6379 is never touched)."""
    import shutil
    import subprocess
    import time

    from conftest import free_port, port_open

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.redis
def test_retry_sends_a_real_celery_message(tmp_path: Path, sqlite_url: str, own_redis: str) -> None:
    """The serve wiring (dicom_node.cli.serve.compose): retry over HTTP → job queued in the database → a
    ``dicom_node.detect`` message for that job on the ``brain_mri`` queue of a real Redis."""
    import base64
    import json

    import redis

    from dicom_node.admin.actions import JobActions
    from dicom_node.workers.app import CeleryDispatcher
    from dicom_node.workers.app import create_app as create_celery_app
    from dicom_node.workers.versions import model_card_versions

    db = Database(sqlite_url)
    try:
        rows = fill(db)
        settings = _settings(tmp_path, sqlite_url).model_copy(deep=True)
        settings.broker.url = own_redis
        dispatcher = CeleryDispatcher(create_celery_app(settings), settings)
        actions = JobActions(db, settings, dispatcher, model_version=model_card_versions(settings))
        with TestClient(create_app(settings, db, actions)) as c:
            assert c.get("/readyz").json()["checks"]["broker"] == "ok"
            job_id = rows.jobs["brain_failed"]
            response = c.post(f"/api/jobs/{job_id}/retry", headers={"Authorization": f"Bearer {ADMIN}"})
            assert response.status_code == 200, response.text
        client = redis.Redis.from_url(own_redis)
        messages = [json.loads(m) for m in client.lrange("brain_mri", 0, -1)]
        client.close()
        sent = [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]
        assert sent == [("dicom_node.detect", [job_id])]
    finally:
        db.dispose()
