"""Property-based run of schemathesis over every operation of the admin API's own ``/openapi.json``.

The real app (``create_app``) against a real SQLite job database filled with the admin test rows, the real job
state machine behind the actions (with a broker-free dispatcher), and an admin token on every request. Whatever the
generated parameters (huge ids and offsets, odd durations, empty strings), the API must answer a 4xx with a
message, never a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_rows import fill
from workers_support import RecordingDispatcher

from dicom_node.admin.actions import JobActions
from dicom_node.admin.api import create_app
from dicom_node.config import load_settings
from dicom_node.db import Database
from dicom_node.workers.versions import model_card_versions

schemathesis = pytest.importorskip("schemathesis")  # the dev extra
import hypothesis  # noqa: E402 - installed with schemathesis
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

ADMIN = "admin-token-for-schemathesis"
READ = "read-token-for-schemathesis"
# Fuzzing examples per operation (the coverage phase's boundary values come on top): the whole run stays within
# some tens of seconds on a 2-core machine.
MAX_EXAMPLES = 40


@pytest.fixture
def admin_app(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    db = Database(sqlite_url)
    fill(db)
    settings = load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path)},
            "database": {"url": sqlite_url},
            "http": {"read_tokens": [READ], "admin_tokens": [ADMIN]},
        }
    )
    try:
        yield create_app(
            settings, db, JobActions(db, settings, RecordingDispatcher(), model_version=model_card_versions(settings))
        )
    finally:
        db.dispose()


def _schema_app() -> Any:
    """The app for reading ``/openapi.json`` at collection time: the same ``create_app``, on a database that is
    never opened (the schema does not depend on data). The requests go to ``admin_app``."""
    settings = load_settings(overrides={"http": {"read_tokens": [READ], "admin_tokens": [ADMIN]}})
    return create_app(settings, Database("sqlite://", upgrade=False))


# schemathesis.pytest.from_fixture would load it per test, but its lazy loader does not run on pytest 9.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", _schema_app(), config=SchemathesisConfig.from_dict({"seed": 20})
)


def test_schema_is_the_apps(admin_app: Any) -> None:
    assert schema.raw_schema == admin_app.openapi()
    assert {op.ok().label for op in schema.get_all_operations()} >= {
        "GET /api/jobs",
        "GET /api/jobs/{job_id}",
        "GET /api/stats",
        "GET /api/stats/throughput",
        "POST /api/jobs/{job_id}/retry",
    }


# The parametrization also gives each operation its own test id (``...[GET /api/jobs][admin]``): without one,
# schemathesis's items all share the function's id on pytest 9.
@schema.parametrize()
@pytest.mark.parametrize("token", [ADMIN], ids=["admin"])
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_admin_api_never_answers_5xx(case: Any, token: str, admin_app: Any) -> None:
    case.call_and_validate(app=admin_app, headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error])
