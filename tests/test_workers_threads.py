"""CPU pool processes share the CPUs out as torch threads (issue 22): 2 processes on 2 cores get 1 thread each; on
the CPU a forward pass takes at most CPU_MAX_BATCH slices (larger batches cost more CPU per slice there)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dicom_node.workers import context
from dicom_node.workers.context import CPU_MAX_BATCH, batch_size_for, cpu_threads, set_cpu_threads


@pytest.fixture
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cpus", "processes", "threads"), [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 4, 4), (1, 1, 1)])
def test_cpus_shared_out(monkeypatch: pytest.MonkeyPatch, cpus: int, processes: int, threads: int) -> None:
    monkeypatch.setattr(context, "available_cpus", lambda: cpus)
    assert cpu_threads(processes) == threads


def test_set_cpu_threads(monkeypatch: pytest.MonkeyPatch, keep_threads: None) -> None:
    monkeypatch.setattr(context, "available_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_cpu_threads(2) == 2
    assert torch.get_num_threads() == 2


def test_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch, keep_threads: None) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_cpu_threads(1) is None
    assert torch.get_num_threads() == 1


def test_cpu_batch_is_capped() -> None:
    assert batch_size_for(16, "cpu") == CPU_MAX_BATCH == 2
    assert batch_size_for(1, "cpu") == 1
    assert batch_size_for(16, "cuda:0") == 16
