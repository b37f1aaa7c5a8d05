"""End to end: ``dicom-node serve --http-port`` in a subprocess, a real series sent with DCMTK storescu, then the admin
API, /metrics and the CLI read what the node recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import DICOM_DATA, REPO, free_port, port_open
from prometheus_client.parser import text_string_to_metric_families

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DICOM_NODE = REPO / ".venv" / "bin" / "dicom-node"
SERIES = DICOM_DATA / "mr_brain_t1_siemens"
READ = "serve-test-reader"
ADMIN = "serve-test-admin"


class Served:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.data_dir = tmp_path / "node"
        self.config = tmp_path / "dicom-node.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": self.dicom_port, "data_dir": str(self.data_dir), "bind_address": "127.0.0.1"},
                    "database": {"url": database_url},
                    "storage": {"min_free_bytes": 0},
                    "completion": {"quiet_seconds": 1.0, "check_interval_seconds": 0.2},
                    "workers": {"embedded": False},
                    "http": {"read_tokens": [READ], "admin_tokens": [ADMIN]},
                }
            )
        )
        self.log = tmp_path / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(DICOM_NODE), "serve", "--config", str(self.config), "--http-port", str(self.http_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while not (port_open(self.dicom_port) and port_open(self.http_port)):
            assert self.process.poll() is None, f"node exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"node did not listen:\n{self.log.read_text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[Served]:
    if not (SERIES.is_dir() and os.path.exists(STORESCU)):
        pytest.skip("needs ../shared/data/dicom and DCMTK storescu")
    node = Served(tmp_path, sqlite_url)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def metrics(client: httpx.Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.slow
def test_serve_storescu_then_api_and_metrics(served: Served) -> None:
    files = sorted(p for p in SERIES.iterdir() if p.is_file())
    sent = subprocess.run(
        [
            STORESCU,
            "-aet",
            "MRSCANNER1",
            "-aec",
            "DICOMNODE",
            "-xe",
            "127.0.0.1",
            str(served.dicom_port),
            "+sd",
            str(SERIES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr
    refused = subprocess.run(
        [ECHOSCU, "-aet", "MRSCANNER1", "-aec", "NOT_THE_NODE", "127.0.0.1", str(served.dicom_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0

    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {READ}"}, timeout=30) as client:
        assert client.get("/healthz", headers={"Authorization": ""}).json()["status"] == "ok"
        assert client.get("/api/studies", headers={"Authorization": ""}).status_code == 401
        deadline = time.monotonic() + 60
        while True:
            studies = client.get("/api/studies").json()
            if studies["total"] == 1 and studies["items"][0]["state"] == "complete":
                break
            assert time.monotonic() < deadline, f"study not complete: {studies}\n{served.log.read_text()}"
            time.sleep(0.5)
        study = studies["items"][0]
        assert study["calling_ae_title"] == "MRSCANNER1" and study["instance_count"] == len(files)
        detail = client.get(f"/api/studies/{study['study_instance_uid']}").json()
        assert [s["detector"] for s in detail["series"]] == ["brain_mri"]
        # The scheduler queued one brain_mri job (no worker runs in this test: workers.embedded is false).
        deadline = time.monotonic() + 30
        while not (jobs := client.get("/api/jobs", params={"calling_ae": "MRSCANNER1"}).json())["total"]:
            assert time.monotonic() < deadline, f"no job queued\n{served.log.read_text()}"
            time.sleep(0.5)
        [job] = jobs["items"]
        assert (job["detector"], job["state"]) == ("brain_mri", "queued")
        steps = [s["name"] for s in client.get(f"/api/jobs/{job['id']}/timeline").json()["steps"]]
        assert steps == ["received", "last_received", "complete", "queued"]
        # The admin action goes through the node's own dispatcher (embedded broker) and the job state machine.
        assert client.post(f"/api/jobs/{job['id']}/retry").status_code == 403
        retried = client.post(f"/api/jobs/{job['id']}/retry", headers={"Authorization": f"Bearer {ADMIN}"})
        assert retried.status_code == 200 and retried.json()["job_ids"] == [job["id"]], retried.text
        events = client.get(f"/api/jobs/{job['id']}/timeline").json()["events"]
        assert events[-1]["event"] == "resend"

        m = metrics(client)
        assert m["dicom_node_instances_received_total"][()] == len(files)
        assert m["dicom_node_received_bytes_total"][()] > 0
        associations = m["dicom_node_associations_total"]
        assert associations[(("outcome", "accepted"), ("reason", ""))] >= 1
        rejected = {dict(k)["reason"]: v for k, v in associations.items() if dict(k)["outcome"] == "rejected"}
        assert sum(rejected.values()) == 1, associations
        assert m["dicom_node_studies"][(("state", "complete"),)] == 1
        assert m["dicom_node_queue_depth"] == {(("detector", "brain_mri"),): 1.0}

    # The CLI reads the same database.
    stats = subprocess.run(
        [str(DICOM_NODE), "stats", "--config", str(served.config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stats.returncode == 0, stats.stderr
    assert f'"instances_received": {len(files)}' in stats.stdout
