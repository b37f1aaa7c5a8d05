"""The admin REST API, web page and ``/metrics`` (FastAPI; OpenAPI at ``/openapi.json``, docs at ``/docs``).

Access: ``/healthz`` and ``/readyz`` need no token; the web page's static files (no data in them), ``/docs`` and
``/openapi.json`` are public too. Everything that returns data (``/api/...``, ``/metrics``) needs
``Authorization: Bearer <token>`` with a token from ``http.read_tokens`` or ``http.admin_tokens``; the actions
(``POST``) need an admin token. No token or an unknown one: 401; a read token on an action: 403.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path as FilePath
from typing import Annotated, Any

import swagger_ui
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from dicom_node import __version__
from dicom_node.admin import queries
from dicom_node.admin.actions import ActionError, AdminActions
from dicom_node.admin.metrics import make_registry
from dicom_node.admin.schemas import (
    ActionResult,
    Health,
    JobPage,
    JobSummary,
    JobTimeline,
    QueueReport,
    SeriesPage,
    Stats,
    StudyDetail,
    StudyPage,
    Throughput,
)
from dicom_node.config import Settings
from dicom_node.db import Database, JobState, StudyState
from dicom_node.timeutil import parse_duration, parse_time

log = logging.getLogger(__name__)

STATIC_DIR = FilePath(__file__).parent / "static"
SWAGGER_UI_DIR = FilePath(swagger_ui.__file__).parent / "static"


HTTP_422 = 422  # Unprocessable Content (RFC 9110 15.5.21); starlette renamed its constant between versions.


class Access(Enum):
    READ = "read"
    ADMIN = "admin"


_bearer = HTTPBearer(auto_error=False, description="a token from http.read_tokens or http.admin_tokens")


def _token_checker(settings: Settings, needed: Access) -> Callable[..., Access]:
    read_tokens = [t.encode() for t in settings.http.read_tokens]
    admin_tokens = [t.encode() for t in settings.http.admin_tokens]

    def matches(token: bytes, candidates: list[bytes]) -> bool:
        # Compare against every candidate in constant time, so timing does not tell which token nearly matched.
        found = False
        for candidate in candidates:
            found |= secrets.compare_digest(token, candidate)
        return found

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Access:
        unauthorized = HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise unauthorized
        token = credentials.credentials.encode()
        if matches(token, admin_tokens):
            return Access.ADMIN
        if matches(token, read_tokens):
            if needed is Access.ADMIN:
                raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs an admin token")
            return Access.READ
        raise unauthorized

    return check


def _session(request: Request) -> Iterator[Session]:
    """One transaction per request on the app's job database."""
    with request.app.state.db.session() as session:
        yield session


# Module level (not inside create_app) so FastAPI can resolve the postponed annotations.
SessionDep = Annotated[Session, Depends(_session)]
Limit = Annotated[int, Query(ge=1, le=queries.MAX_LIMIT, description="page size")]
Offset = Annotated[int, Query(ge=0, le=queries.MAX_OFFSET, description="items to skip")]
JobId = Annotated[int, Path(ge=1, le=queries.MAX_ID, description="job id")]
Since = Annotated[str | None, Query(description="24h, 7d, or ISO 8601 time (UTC when no offset); empty: not given")]
DEFAULT_PERIOD = "24h"
Period = Annotated[str, Query(description="24h, 7d, or ISO 8601 time (UTC when no offset); empty: the default, 24h")]

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _printable_parameters(request: Request) -> None:
    """Every query and path parameter is text without control characters: none has a use for them, and PostgreSQL
    refuses NUL in a text value (a 500 otherwise)."""
    for where, items in (("query", request.query_params.multi_items()), ("path", request.path_params.items())):
        for name, value in items:
            if isinstance(value, str) and _CONTROL_CHARACTER.search(value):
                raise HTTPException(HTTP_422, f"{where} parameter {name!r} contains a control character")


def _times(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """``since``/``until`` parsed (empty or absent: None); a 422 naming the problem otherwise."""
    try:
        return (parse_time(since) if since else None, parse_time(until) if until else None)
    except ValueError as err:
        raise HTTPException(HTTP_422, str(err)) from None


def _states(values: list[str] | None, allowed: type[Enum]) -> list[str]:
    """``?state=failed&state=queued`` or ``?state=failed,queued``; unknown states are a 422 naming the choices."""
    states = [part.strip() for value in values or [] for part in value.split(",") if part.strip()]
    choices = {member.value for member in allowed}
    unknown = [s for s in states if s not in choices]
    if unknown:
        raise HTTPException(HTTP_422, f"unknown state {unknown[0]!r}; one of: {', '.join(sorted(choices))}")
    return states


def create_app(settings: Settings, db: Database, actions: AdminActions | None = None) -> FastAPI:
    """The admin application for one node. ``actions`` None: the action endpoints answer 503 (read-only API)."""
    app = FastAPI(
        title="dicom-node admin API",
        version=__version__,
        description=__doc__,
        # FastAPI's own /docs and /redoc load their scripts from a CDN; ours serves Swagger UI from the package.
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {"name": "studies", "description": "what came in"},
            {"name": "jobs", "description": "what ran, failed, and was delivered"},
            {"name": "actions", "description": "retry, re-run, re-deliver (admin token)"},
            {"name": "operations", "description": "health, readiness, statistics, Prometheus metrics"},
        ],
    )
    printable = Depends(_printable_parameters)
    # The token first (an unauthenticated request learns nothing about its parameters), then the parameters.
    read = [Depends(_token_checker(settings, Access.READ)), printable]
    admin = [Depends(_token_checker(settings, Access.ADMIN)), printable]
    app.state.db = db

    @app.exception_handler(queries.NotFound)
    def _not_found(_request: Request, err: queries.NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=status.HTTP_404_NOT_FOUND)

    # Included in this order, which is also the order of /openapi.json.
    app.include_router(_health_routes(settings, db))
    app.include_router(_study_routes(read))
    app.include_router(_job_routes(read))
    app.include_router(_operation_routes(settings, db, read))
    app.include_router(_action_routes(actions, admin))
    _add_page(app)
    return app


Dependencies = list[Any]


def _health_routes(settings: Settings, db: Database) -> APIRouter:
    """Liveness and readiness: no token."""
    router = APIRouter()

    @router.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> Health:
        """Liveness: the HTTP service answers (no token)."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
    def readyz(response: Response) -> Health:
        """Readiness: the job database answers, and the broker when one is configured (no token)."""
        checks = {"database": _check_database(db), "broker": _check_broker(settings.broker.url)}
        ready = all(value in ("ok", "not configured (embedded)") for value in checks.values())
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="ok" if ready else "unavailable", checks=checks)

    return router


def _study_routes(read: Dependencies) -> APIRouter:
    """What came in: studies and series with their routing decision."""
    router = APIRouter()

    @router.get("/api/studies", response_model=StudyPage, tags=["studies"], dependencies=read)
    def studies(
        s: SessionDep,
        state: Annotated[list[str] | None, Query(description="receiving, complete")] = None,
        detector: str | None = None,
        abnormal: bool | None = None,
        calling_ae: Annotated[str | None, Query(description="calling AE title of the sender")] = None,
        since: Since = None,
        until: Since = None,
        order: Annotated[str, Query(pattern="^(recent|triage)$", description="triage: abnormal first")] = "recent",
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> StudyPage:
        """Studies, newest first (``order=triage``: abnormal first), with their triage flag and job states."""
        start, end = _times(since, until)
        flt = queries.StudyFilter(
            states=_states(state, StudyState),
            detector=detector,
            abnormal=abnormal,
            calling_ae_title=calling_ae,
            since=start,
            until=end,
            triage_order=order == "triage",
        )
        return queries.list_studies(s, flt, limit, offset)

    @router.get("/api/studies/{study_uid}", response_model=StudyDetail, tags=["studies"], dependencies=read)
    def study(s: SessionDep, study_uid: str) -> StudyDetail:
        """One study: its series with their routing decision, and its jobs."""
        return queries.get_study(s, study_uid)

    @router.get("/api/series", response_model=SeriesPage, tags=["studies"], dependencies=read)
    def series(
        s: SessionDep,
        study_uid: str | None = None,
        detector: str | None = None,
        modality: str | None = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> SeriesPage:
        """Series with the detector they were routed to, or the reason they were ignored."""
        return queries.list_series(s, study_uid, detector, modality, limit, offset)

    return router


def _job_routes(read: Dependencies) -> APIRouter:
    """What ran, failed and was delivered."""
    router = APIRouter()

    @router.get("/api/jobs", response_model=JobPage, tags=["jobs"], dependencies=read)
    def jobs(
        s: SessionDep,
        state: Annotated[
            list[str] | None,
            Query(
                description="queued, running, succeeded, failed, delivered, delivery_failed, ...; repeatable or "
                "comma-separated; failed means every failure (detection and delivery_failed)"
            ),
        ] = None,
        detector: str | None = None,
        abnormal: bool | None = None,
        calling_ae: Annotated[str | None, Query(description="calling AE title of the sender")] = None,
        study_uid: str | None = None,
        since: Since = None,
        until: Since = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> JobPage:
        """Jobs, newest first; ``total`` counts all pages."""
        start, end = _times(since, until)
        flt = queries.JobFilter(
            states=_states(state, JobState),
            detector=detector,
            abnormal=abnormal,
            calling_ae_title=calling_ae,
            study_instance_uid=study_uid,
            since=start,
            until=end,
        )
        return queries.list_jobs(s, flt, limit, offset)

    @router.get("/api/jobs/{job_id}", response_model=JobSummary, tags=["jobs"], dependencies=read)
    def job(s: SessionDep, job_id: JobId) -> JobSummary:
        return queries.get_job(s, job_id)

    @router.get("/api/jobs/{job_id}/timeline", response_model=JobTimeline, tags=["jobs"], dependencies=read)
    def timeline(s: SessionDep, job_id: JobId) -> JobTimeline:
        """received → complete → queued → started → finished → each delivery attempt, with durations."""
        return queries.job_timeline(s, job_id)

    return router


def _operation_routes(settings: Settings, db: Database, read: Dependencies) -> APIRouter:
    """Statistics, queue, throughput and Prometheus metrics."""
    router = APIRouter()
    registry = make_registry(db)

    @router.get("/api/stats", response_model=Stats, tags=["operations"], dependencies=read)
    def stats(s: SessionDep, since: Period = DEFAULT_PERIOD, until: Since = None) -> Stats:
        """Counts, abnormal rate, p50/p95 latency per detector (same as ``dicom-node stats``)."""
        start, end = _times(since or DEFAULT_PERIOD, until)
        assert start is not None  # parsed from a non-empty text
        return queries.stats(s, start, end)

    @router.get("/api/queue", response_model=QueueReport, tags=["operations"], dependencies=read)
    def queue(s: SessionDep) -> QueueReport:
        """Per detector: queue depth, running jobs, live workers and their pool processes, and the expected wait of
        a job queued now (from the median of the detector's last 20 runs; docs/workers.md)."""
        return queries.queue_status(s, settings)

    @router.get("/api/stats/throughput", response_model=Throughput, tags=["operations"], dependencies=read)
    def throughput(
        s: SessionDep,
        since: Period = DEFAULT_PERIOD,
        bucket: Annotated[str, Query(description="bucket width, e.g. 1h (at least 1m); empty: 1h")] = "1h",
    ) -> Throughput:
        """Jobs finished and median latency per detector and time bucket (the web page's plot)."""
        start, _ = _times(since or DEFAULT_PERIOD, None)
        assert start is not None  # parsed from a non-empty text
        try:
            width = parse_duration(bucket or "1h")
        except ValueError as err:
            raise HTTPException(HTTP_422, f"bucket: {err}") from None
        if width < timedelta(minutes=1):
            raise HTTPException(HTTP_422, "bucket must be at least 1m")
        try:
            return queries.throughput(s, start, bucket=width)
        except ValueError as err:  # too many buckets for the period
            raise HTTPException(HTTP_422, str(err)) from None

    @router.get("/metrics", tags=["operations"], dependencies=read, response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition, computed from the job database at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _action_routes(actions: AdminActions | None, admin: Dependencies) -> APIRouter:
    """Retry, re-deliver, re-run (admin token); 503 when this process has no actions."""
    router = APIRouter()

    def run_action(name: str, call: Callable[[AdminActions], list[int]]) -> ActionResult:
        if actions is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "actions are not available in this process")
        try:
            job_ids = call(actions)
        except ActionError as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
        except LookupError as err:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(err).strip("'\"")) from None
        log.info("admin action %s queued jobs %s", name, job_ids)
        return ActionResult(action=name, job_ids=job_ids)

    @router.post("/api/jobs/{job_id}/retry", response_model=ActionResult, tags=["actions"], dependencies=admin)
    def retry(job_id: JobId) -> ActionResult:
        """Queue a failed job again (detection failure: runs again; delivery failure: delivers again)."""
        return run_action("retry", lambda a: a.retry_job(job_id))

    @router.post("/api/jobs/{job_id}/redeliver", response_model=ActionResult, tags=["actions"], dependencies=admin)
    def redeliver(job_id: JobId) -> ActionResult:
        """Send a job's results to the configured destinations again."""
        return run_action("redeliver", lambda a: a.redeliver_job(job_id))

    @router.post("/api/studies/{study_uid}/rerun", response_model=ActionResult, tags=["actions"], dependencies=admin)
    def rerun(study_uid: str) -> ActionResult:
        """Run the detectors on every selected series of the study again."""
        return run_action("rerun", lambda a: a.rerun_study(study_uid))

    return router


def _add_page(app: FastAPI) -> None:
    """The web page and Swagger UI, with their assets served from the installed packages (no CDN)."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI over /openapi.json, with its assets from the installed swagger-ui-py package."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="dicom-node admin API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _check_database(db: Database) -> str:
    try:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return "ok"
    except Exception as err:  # any driver error means "not ready"; the message says which
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _check_broker(url: str | None) -> str:
    """Ping the configured broker (Redis directly, anything else through kombu) with short timeouts."""
    if not url:
        return "not configured (embedded)"
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client: Any = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1)
        return "ok"
    except Exception as err:  # unreachable broker: report, do not crash the probe
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
