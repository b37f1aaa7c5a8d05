"""The job lifecycle (``dicom_node.jobs.lifecycle``): the table of allowed transitions, the one writer of
``Job.state``, and the jobs package's import contract (no detectors, workers, Celery or torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update
from test_layers import ROOT, module_files, violations
from workers_support import RecordingDispatcher, make_study

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, JobEvent, JobState
from dicom_node.jobs.lifecycle import ALLOWED, JobStateError, move, transition
from dicom_node.jobs.scheduler import JobScheduler

LIFECYCLE = "dicom_node.jobs.lifecycle"
PAIRS = [(a, b) for a in JobState for b in JobState]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(overrides={"node": {"data_dir": str(tmp_path / "data")}})


@pytest.fixture
def job_id(database: Database, settings: Settings, tmp_path: Path) -> int:
    made = make_study(database, tmp_path / "in")
    scheduler = JobScheduler(database, settings, RecordingDispatcher(), model_version=lambda detector: "v1")
    (created,) = scheduler.on_study_complete(made.study_id)
    return created


def force_state(db: Database, job_id: int, state: JobState) -> None:
    """Test set-up only: put the job in ``state`` without an event."""
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=state))


def snapshot(db: Database, job_id: int) -> tuple[JobState, int]:
    with db.session() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        events = len(session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id)).all())
    assert state is not None
    return JobState(state), events


def test_every_state_has_a_row_and_superseded_is_reachable_from_all_others() -> None:
    assert set(ALLOWED) == set(JobState)
    assert all(JobState.SUPERSEDED in targets for state, targets in ALLOWED.items() if state != JobState.SUPERSEDED)


def test_an_illegal_transition_raises_and_changes_nothing(database: Database, job_id: int) -> None:
    illegal = [(a, b) for a, b in PAIRS if b not in ALLOWED[a]]
    assert (JobState.QUEUED, JobState.SUCCEEDED) in illegal and (JobState.FAILED, JobState.DELIVERED) in illegal
    for from_state, to_state in illegal:
        force_state(database, job_id, from_state)
        before = snapshot(database, job_id)
        with pytest.raises(JobStateError), database.session() as session:
            transition(session, job_id, from_state, to_state, "illegal", error="must not be written")
        assert snapshot(database, job_id) == before, (from_state, to_state)
    with database.session() as session:
        assert session.scalar(select(Job.error).where(Job.id == job_id)) is None


def test_every_allowed_transition_is_a_compare_and_set_with_its_event(database: Database, job_id: int) -> None:
    for from_state, to_state in [(a, b) for a, b in PAIRS if b in ALLOWED[a]]:
        force_state(database, job_id, from_state)
        stale = next((state for state in JobState if state != from_state and to_state in ALLOWED[state]), None)
        if stale is not None:
            with database.session() as session:  # someone else moved it first: nothing happens
                assert not transition(session, job_id, stale, to_state, "lost race")
        _, events = snapshot(database, job_id)
        with database.session() as session:
            assert transition(session, job_id, from_state, to_state, "moved")
        assert snapshot(database, job_id) == (to_state, events + 1)
        with database.session() as session:
            last = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()))
            event = last.first()
            assert event is not None
            assert (event.event, event.from_state, event.to_state) == ("moved", from_state.value, to_state.value)


def test_move_updates_the_loaded_job_and_loses_a_race(database: Database, job_id: int) -> None:
    force_state(database, job_id, JobState.SUCCEEDED)
    with database.session() as session:
        job = session.get_one(Job, job_id)
        assert move(session, job, JobState.DELIVERED, "delivered", detail="stored")
        assert job.state == JobState.DELIVERED
    assert snapshot(database, job_id)[0] == JobState.DELIVERED
    with database.session() as session:
        job = session.get_one(Job, job_id)
        force_state(database, job_id, JobState.QUEUED)  # a re-run moved it meanwhile
        assert not move(session, job, JobState.DELIVERY_FAILED, "delivery_failed")
        assert job.state == JobState.DELIVERED
    assert snapshot(database, job_id)[0] == JobState.QUEUED


# --- the one writer of Job.state -----------------------------------------------------------------------------------


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _assigns_state(node: ast.AST) -> bool:
    """``<x>.state = value`` where ``x`` is named like a job or ``value`` is a ``JobState`` member."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        targets, value = [node.target], node.value
    else:
        return False
    direct = isinstance(value, ast.Attribute) and "JobState" in _names(value)
    return any(
        isinstance(target, ast.Attribute)
        and target.attr == "state"
        and (direct or any("job" in name.lower() for name in _names(target.value)))
        for target in targets
    )


def _on_job_table(statement: ast.expr) -> bool:
    """The statement is built from ``update(Job)`` or ``insert(Job)``."""
    return any(
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id in ("update", "insert")
        and any(isinstance(arg, ast.Name) and arg.id == "Job" for arg in call.args)
        for call in ast.walk(statement)
    )


def _call_writes_state(call: ast.Call) -> bool:
    """``...values(state=...)`` on the job table, ``Job(state=...)``, ``setattr``/``set_committed_value`` "state"."""
    func = call.func
    keywords = {keyword.arg for keyword in call.keywords}
    if isinstance(func, ast.Attribute) and func.attr == "values" and _on_job_table(func.value):
        keys = {key.value for arg in call.args if isinstance(arg, ast.Dict) for key in arg.keys
                if isinstance(key, ast.Constant)}  # fmt: skip
        return "state" in keywords or "state" in keys
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name == "Job":
        return "state" in keywords
    named = call.args[1:2]
    return name in ("setattr", "set_committed_value") and any(
        isinstance(arg, ast.Constant) and arg.value == "state" for arg in named
    )


def state_writes(source: str) -> list[int]:
    """Lines of ``source`` that write ``Job.state``."""
    return sorted(
        node.lineno  # type: ignore[attr-defined]
        for node in ast.walk(ast.parse(source))
        if _assigns_state(node) or (isinstance(node, ast.Call) and _call_writes_state(node))
    )


def test_the_state_write_finder_finds_each_form() -> None:
    source = """
job.state = to_state
existing.state = JobState.QUEUED
session.execute(update(Job).where(Job.id == 1).values(state=JobState.FAILED))
session.execute(update(Job).values({"state": "failed"}))
Job(study_id=1, state=JobState.QUEUED)
setattr(job, "state", JobState.QUEUED)
set_committed_value(job, "state", JobState.QUEUED)
report.state = str(JobState.DELIVERED)
update(Study).values(state=StudyState.COMPLETE)
"""
    assert state_writes(source) == [2, 3, 4, 5, 6, 7, 8]


def test_only_the_lifecycle_writes_job_state() -> None:
    files = [*module_files(), *((f"bench.{path.stem}", path) for path in sorted((ROOT / "bench").glob("*.py")))]
    found = [
        f"{module}:{line}" for module, path in files if module != LIFECYCLE for line in state_writes(path.read_text())
    ]
    assert found == [], "change Job.state only through dicom_node.jobs.lifecycle (transition / move)"
    assert state_writes((ROOT / "dicom_node" / "jobs" / "lifecycle.py").read_text()), "the finder sees nothing"


# --- import contract -----------------------------------------------------------------------------------------------

JOBS_FORBIDDEN = ("dicom_node.models", "dicom_node.workers", "celery", "kombu", "billiard", "torch")
# Loaded at run time all the same: the configuration validates detector names against the (torch-free) registry.
LOADED_BY_CONFIG = ("dicom_node.models",)


def test_the_jobs_package_never_imports_detectors_workers_celery_or_torch() -> None:
    assert violations(("dicom_node.jobs",), JOBS_FORBIDDEN) == []
    modules = [module for module, _ in module_files() if module.startswith("dicom_node.jobs")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    loaded = tuple(m for m in JOBS_FORBIDDEN if m not in LOADED_BY_CONFIG)
    code += f"print(sorted(m for m in {loaded!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_running_a_detection_job_needs_no_celery() -> None:
    """workers/detection.py is the plain function behind the Celery task: testable, and callable, without Celery."""
    assert violations(("dicom_node.workers.detection",), ("celery", "kombu", "billiard")) == []


def test_a_delivery_finishing_after_a_rerun_keeps_the_newer_state_and_its_record(
    database: Database, job_id: int
) -> None:
    """The job went back to ``queued`` (re-run) while its old results were being delivered: ``delivered`` is not a
    legal move from there, so the state stays, and the delivery's event is recorded all the same (nothing lost)."""
    from dicom_node.delivery.pipeline import _event

    state_before, events_before = snapshot(database, job_id)
    assert state_before == JobState.QUEUED
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        _event(session, job, "delivered", "stored at PACS", JobState.DELIVERED)
    state, events = snapshot(database, job_id)
    assert (state, events) == (JobState.QUEUED, events_before + 1)
    with database.session() as session:
        last = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())).first()
        assert last is not None and last.event == "delivered" and "moved on" in (last.detail or "")
