"""Prometheus /metrics scraped over HTTP, computed from a real job database (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from admin_rows import Rows, fill
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.admin.api import create_app
from dicom_node.admin.metrics import gpu_memory
from dicom_node.config import load_settings
from dicom_node.db import Database

TOKEN = "metrics-reader"


def scrape(database: Database, tmp_path: Path) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by sorted label pairs."""
    settings = load_settings(overrides={"node": {"data_dir": str(tmp_path)}, "http": {"read_tokens": [TOKEN]}})
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/metrics").status_code == 401
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_from_job_database(database: Database, tmp_path: Path) -> None:
    rows: Rows = fill(database)
    assert rows.jobs
    m = scrape(database, tmp_path)

    assert m["dicom_node_instances_received_total"][()] == 34
    assert m["dicom_node_received_bytes_total"][()] > 0
    associations = m["dicom_node_associations_total"]
    assert associations[(("outcome", "accepted"), ("reason", ""))] == 5
    assert associations[(("outcome", "rejected"), ("reason", "calling AE title not allowed"))] == 2
    assert associations[(("outcome", "rejected"), ("reason", "called AE title not recognised"))] == 1

    assert m["dicom_node_queue_depth"] == {(("detector", "chest_xray"),): 1.0}
    assert m["dicom_node_jobs"][(("detector", "chest_xray"), ("state", "delivered"))] == 1

    buckets = m["dicom_node_job_stage_duration_seconds_bucket"]
    counts = m["dicom_node_job_stage_duration_seconds_count"]
    sums = m["dicom_node_job_stage_duration_seconds_sum"]
    # brain_mri ran twice (14 s delivered job, 0.4 s failed job): one run ≤ 0.5 s, both ≤ 20 s, none ≤ 10 s.
    run = (("detector", "brain_mri"), ("stage", "run"))
    assert counts[run] == 2 and sums[run] == pytest.approx(14.4, abs=1e-3)
    assert buckets[(("detector", "brain_mri"), ("le", "0.5"), ("stage", "run"))] == 1
    assert buckets[(("detector", "brain_mri"), ("le", "10.0"), ("stage", "run"))] == 1
    assert buckets[(("detector", "brain_mri"), ("le", "20.0"), ("stage", "run"))] == 2
    assert buckets[(("detector", "brain_mri"), ("le", "+Inf"), ("stage", "run"))] == 2
    # Queue wait: every started job waited 0.2 s; the queued one is not counted yet.
    wait = (("detector", "chest_xray"), ("stage", "queue_wait"))
    assert counts[wait] == 2 and sums[wait] == pytest.approx(0.4, abs=1e-3)
    delivery = (("detector", "brain_mri"), ("stage", "delivery"))
    assert counts[delivery] == 1 and sums[delivery] == pytest.approx(3.6, abs=1e-3)

    to_pacs = m["dicom_node_receive_to_pacs_seconds_count"]
    assert to_pacs == {(("detector", "brain_mri"),): 1.0, (("detector", "chest_xray"),): 1.0}
    chest_latency = m["dicom_node_receive_to_pacs_seconds_sum"][(("detector", "chest_xray"),)]
    assert chest_latency == pytest.approx(30 + 0.05 + 0.2 + 1.2 + 0.2 + 0.5, abs=1e-3)
    assert m["dicom_node_receive_to_pacs_seconds_bucket"][(("detector", "chest_xray"), ("le", "30.0"))] == 0
    assert m["dicom_node_receive_to_pacs_seconds_bucket"][(("detector", "chest_xray"), ("le", "45.0"))] == 1

    failures = m["dicom_node_failures_total"]
    assert failures == {
        (("detector", "brain_mri"), ("stage", "detect")): 1.0,
        (("detector", "chest_xray"), ("stage", "delivery")): 1.0,
    }
    assert m["dicom_node_delivery_attempts_total"][(("outcome", "retry"),)] == 1
    # No torch in this process: no GPU metrics, and scraping did not import it.
    assert not any(name.startswith("dicom_node_gpu") for name in m)


def test_gpu_memory_only_when_torch_loaded() -> None:
    import sys

    if "torch" not in sys.modules:
        assert list(gpu_memory()) == []
    else:  # another test imported torch: on this CPU-only machine CUDA is not initialised
        torch = sys.modules["torch"]
        assert bool(list(gpu_memory())) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_gpu_memory_reads_an_initialised_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU on the CI machine: a stand-in for ``torch.cuda`` (the only thing read) checks the exposition; the real
    path runs where embedded workers hold a GPU."""
    import sys
    import types

    class Properties:
        total_memory = 80 * 2**30

    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: (i + 1) * 2**30,
        memory_reserved=lambda i: (i + 2) * 2**30,
        get_device_properties=lambda i: Properties(),
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    families = {f.name: {s.labels["device"]: s.value for s in f.samples} for f in gpu_memory()}
    assert families == {
        "dicom_node_gpu_memory_allocated_bytes": {"cuda:0": 2**30, "cuda:1": 2 * 2**30},
        "dicom_node_gpu_memory_reserved_bytes": {"cuda:0": 2 * 2**30, "cuda:1": 3 * 2**30},
        "dicom_node_gpu_memory_total_bytes": {"cuda:0": 80 * 2**30, "cuda:1": 80 * 2**30},
    }
    cuda.is_initialized = lambda: False  # torch loaded but CUDA never used: nothing to report
    assert list(gpu_memory()) == []
