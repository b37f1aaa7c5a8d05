"""Group commit (dicom_node/db/batch.py): units from many threads share transactions; a failing unit fails alone."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db import AuditEvent, Database
from dicom_node.db.batch import Attempt, GroupCommit


def _audit(reason: str, fail: bool = False) -> Callable[[Session, Attempt], str]:
    def work(session: Session, attempt: Attempt) -> str:
        session.add(AuditEvent(event="test", reason=reason))
        session.flush()  # the row is written in the shared transaction before the unit fails
        attempt.scratch.setdefault("units", []).append(reason)
        if fail:
            raise ValueError(f"unit {reason} fails")
        return reason

    return work


def _reasons(database: Database) -> list[str]:
    with database.session() as session:
        return sorted(r or "" for r in session.execute(select(AuditEvent.reason)).scalars())


def test_units_from_many_threads_are_all_committed(database: Database) -> None:
    commits = GroupCommit(database)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: commits.run(_audit(f"r{i:03d}")), range(200)))
    finally:
        commits.close()
    assert results == [f"r{i:03d}" for i in range(200)]  # each caller gets its own unit's result
    assert _reasons(database) == [f"r{i:03d}" for i in range(200)]


def test_a_failing_unit_fails_alone_and_leaves_nothing(database: Database) -> None:
    commits = GroupCommit(database)
    outcomes: dict[str, str] = {}

    def run(i: int) -> None:
        reason = f"r{i:02d}"
        try:
            outcomes[reason] = commits.run(_audit(reason, fail=i % 7 == 3))
        except ValueError as err:
            outcomes[reason] = str(err)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, range(50)))
    finally:
        commits.close()
    failed = {f"r{i:02d}" for i in range(50) if i % 7 == 3}
    assert {r for r, outcome in outcomes.items() if outcome.startswith("unit")} == failed
    # The failing units' rows were rolled back with their batch; the others were committed once each.
    assert _reasons(database) == sorted(f"r{i:02d}" for i in range(50) if f"r{i:02d}" not in failed)


def test_close_commits_what_is_queued_and_refuses_more(database: Database) -> None:
    commits = GroupCommit(database)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(commits.run, _audit(f"q{i}")) for i in range(20)]
        commits.close()
        # Every unit queued before close() was committed; one that came after was refused, none hangs.
        done = [f.exception(timeout=30) or f.result() for f in futures]
    committed = [d for d in done if isinstance(d, str)]
    assert all(isinstance(d, (str, RuntimeError)) for d in done)
    assert sorted(_reasons(database)) == sorted(committed)
    with pytest.raises(RuntimeError, match="closed"):
        commits.run(_audit("late"))


@pytest.mark.parametrize("units", [1, 5])
def test_scratch_is_shared_by_the_units_of_one_attempt(database: Database, units: int) -> None:
    seen: list[int] = []
    commits = GroupCommit(database)

    def work(session: Session, attempt: Attempt) -> None:
        attempt.scratch["count"] = attempt.scratch.get("count", 0) + 1
        seen.append(attempt.scratch["count"])

    try:
        for _ in range(units):
            commits.run(work)
    finally:
        commits.close()
    assert seen == [1] * units  # one unit per batch when they arrive one after another
