"""Read-side queries over the job database, shared by the REST API, the web page and the CLI.

Plain functions over a SQLAlchemy ``Session`` that return the pydantic shapes of ``schemas.py``; they never write.
Each list is one filtered SELECT plus one COUNT over the same filters, so paging stays cheap with many jobs.
"""

from __future__ import annotations

import enum
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, case, func, or_, select
from sqlalchemy.orm import Session

from dicom_node.admin.schemas import (
    DeliveryAttemptOut,
    DetectorStats,
    Durations,
    JobBrief,
    JobEventOut,
    JobPage,
    JobSummary,
    JobTimeline,
    QueueReport,
    QueueStatus,
    ResultObjectOut,
    SeriesPage,
    SeriesSummary,
    Stats,
    StudyDetail,
    StudyPage,
    StudySummary,
    Throughput,
    ThroughputSeries,
    TimelineStep,
)
from dicom_node.config import Settings
from dicom_node.db.models import (
    DeliveryAttempt,
    Instance,
    Job,
    JobEvent,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyState,
)
from dicom_node.heartbeat import Liveness
from dicom_node.timeutil import percentile, seconds, utc, utc_or_none

MAX_LIMIT = 1000
# Ids and offsets are compared in the database as signed 64-bit integers (SQLite INTEGER, PostgreSQL bigint): a
# larger number cannot name a row, and SQLite refuses to bind it.
MAX_ID = 2**63 - 1
MAX_OFFSET = 2**63 - 1
MAX_BUCKETS = 10_000  # throughput buckets in one answer
FAILED_STATES = (JobState.FAILED.value, JobState.DELIVERY_FAILED.value)


def job_states_filter(states: Sequence[str]) -> list[JobState]:
    """The job states a state filter means: ``failed`` is every failure, in detection (``failed``) and in delivery
    (``delivery_failed``); the jobs' own ``state`` still says which. Other names are the state itself."""
    expanded: list[JobState] = []
    for name in states:
        for state in FAILED_STATES if name == JobState.FAILED.value else (name,):
            if JobState(state) not in expanded:
                expanded.append(JobState(state))
    return expanded


class NotFound(LookupError):
    """The requested study, series or job does not exist."""


@dataclass(frozen=True)
class ListFilter:
    """The filters the job and study lists share; every given condition must hold. ``states``: any of them."""

    states: Sequence[str] = ()
    detector: str | None = None
    abnormal: bool | None = None
    calling_ae_title: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class JobFilter(ListFilter):
    """Filters of the job list. Times are compared with ``Job.created_at``; the state ``failed`` includes
    ``delivery_failed`` (see ``job_states_filter``)."""

    study_instance_uid: str | None = None


@dataclass(frozen=True)
class StudyFilter(ListFilter):
    """Filters of the study list. Times are compared with ``Study.last_received_at``."""

    triage_order: bool = False


def _sender_and_period(query: Select, flt: ListFilter, received: Any) -> Select:
    """The conditions both lists apply alike: the sender's calling AE title and the period on ``received``."""
    if flt.calling_ae_title:
        query = query.where(Study.calling_ae_title == flt.calling_ae_title)
    if flt.since is not None:
        query = query.where(received >= utc(flt.since))
    if flt.until is not None:
        query = query.where(received < utc(flt.until))
    return query


def _page_bounds(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(limit, MAX_LIMIT)), max(0, offset)


def _job_summary(
    job: Job, study_uid: str, accession: str | None, calling_ae: str | None, series_uid: str
) -> JobSummary:
    return JobSummary(
        id=job.id,
        study_id=job.study_id,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        accession_number=accession,
        calling_ae_title=calling_ae,
        detector=job.detector,
        model_version=job.model_version,
        state=str(job.state.value if isinstance(job.state, JobState) else job.state),
        urgent=bool(job.urgent),
        attempts=job.attempts or 0,
        worker=job.worker,
        error=job.error,
        series_score=job.series_score,
        image_threshold=job.image_threshold,
        is_abnormal=job.is_abnormal,
        study_completed_at=utc_or_none(job.study_completed_at),
        created_at=utc(job.created_at),
        queued_at=utc_or_none(job.queued_at),
        started_at=utc_or_none(job.started_at),
        finished_at=utc_or_none(job.finished_at),
        delivered_at=utc_or_none(job.delivered_at),
        predecessor_job_id=job.predecessor_job_id,
    )


def _job_select() -> Select:
    return (
        select(
            Job, Study.study_instance_uid, Study.accession_number, Study.calling_ae_title, Series.series_instance_uid
        )
        .join(Study, Job.study_id == Study.id)
        .join(Series, Job.series_id == Series.id)
    )


def _apply_job_filter(query: Select, flt: JobFilter) -> Select:
    if flt.states:
        query = query.where(Job.state.in_(job_states_filter(flt.states)))
    if flt.detector:
        query = query.where(Job.detector == flt.detector)
    if flt.abnormal is not None:
        query = query.where(Job.is_abnormal.is_(flt.abnormal))
    if flt.study_instance_uid:
        query = query.where(Study.study_instance_uid == flt.study_instance_uid)
    return _sender_and_period(query, flt, Job.created_at)


def list_jobs(session: Session, flt: JobFilter, limit: int = 50, offset: int = 0) -> JobPage:
    """Jobs matching ``flt``, newest first."""
    limit, offset = _page_bounds(limit, offset)
    filtered = _apply_job_filter(_job_select(), flt)
    total = session.scalar(
        _apply_job_filter(select(func.count(Job.id)).select_from(Job).join(Study, Job.study_id == Study.id), flt)
    )
    rows = session.execute(filtered.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return JobPage(total=int(total or 0), limit=limit, offset=offset, items=[_job_summary(*row) for row in rows])


def get_job(session: Session, job_id: int) -> JobSummary:
    row = session.execute(_job_select().where(Job.id == job_id)).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return _job_summary(*row)


def _series_summary(series: Series, study_uid: str) -> SeriesSummary:
    return SeriesSummary(
        id=series.id,
        study_instance_uid=study_uid,
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        series_number=series.series_number,
        series_description=series.series_description,
        body_part_examined=series.body_part_examined,
        view_position=series.view_position,
        instance_count=series.instance_count or 0,
        detector=series.detector,
        routing_rule=series.routing_rule,
        routing_reason=series.routing_reason,
        routed_at=utc_or_none(series.routed_at),
    )


def list_series(
    session: Session,
    study_instance_uid: str | None = None,
    detector: str | None = None,
    modality: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> SeriesPage:
    """Series with their routing decision, newest study first."""
    limit, offset = _page_bounds(limit, offset)
    conditions = []
    if study_instance_uid:
        conditions.append(Study.study_instance_uid == study_instance_uid)
    if detector:
        conditions.append(Series.detector == detector)
    if modality:
        conditions.append(Series.modality == modality)
    where = and_(True, *conditions)
    total = session.scalar(select(func.count(Series.id)).join(Study, Series.study_id == Study.id).where(where))
    rows = session.execute(
        select(Series, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(where)
        .order_by(Series.study_id.desc(), Series.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return SeriesPage(
        total=int(total or 0), limit=limit, offset=offset, items=[_series_summary(s, uid) for s, uid in rows]
    )


def _study_flags() -> Any:
    """Per study: triage flag (1 abnormal, 0 normal, null no result yet), highest score, number of jobs."""
    return (
        select(
            Job.study_id.label("study_id"),
            func.max(case((Job.is_abnormal.is_(True), 1), (Job.is_abnormal.is_(False), 0), else_=None)).label(
                "abnormal"
            ),
            func.max(Job.series_score).label("max_score"),
            func.count(Job.id).label("jobs"),
        )
        .where(Job.state != JobState.SUPERSEDED)
        .group_by(Job.study_id)
        .subquery()
    )


def _apply_study_filter(query: Select, flt: StudyFilter, flags: Any) -> Select:
    if flt.states:
        query = query.where(Study.state.in_([StudyState(s) for s in flt.states]))
    query = _sender_and_period(query, flt, Study.last_received_at)
    if flt.abnormal is True:
        query = query.where(flags.c.abnormal == 1)
    elif flt.abnormal is False:
        query = query.where(flags.c.abnormal == 0)
    if flt.detector:
        query = query.where(
            Study.id.in_(select(Series.study_id).where(Series.detector == flt.detector).scalar_subquery())
        )
    return query


def list_studies(session: Session, flt: StudyFilter, limit: int = 50, offset: int = 0) -> StudyPage:
    """Studies matching ``flt``: newest first, or with ``triage_order`` abnormal first, then no result yet, then
    normal, each newest first."""
    limit, offset = _page_bounds(limit, offset)
    flags = _study_flags()
    series_count = (
        select(Series.study_id.label("study_id"), func.count(Series.id).label("n")).group_by(Series.study_id).subquery()
    )
    base = (
        select(Study, flags.c.abnormal, flags.c.max_score, flags.c.jobs, series_count.c.n)
        .outerjoin(flags, flags.c.study_id == Study.id)
        .outerjoin(series_count, series_count.c.study_id == Study.id)
    )
    query = _apply_study_filter(base, flt, flags)
    count_query = _apply_study_filter(
        select(func.count(Study.id)).select_from(Study).outerjoin(flags, flags.c.study_id == Study.id), flt, flags
    )
    total = session.scalar(count_query)
    if flt.triage_order:
        # Abnormal (1) first, then studies still waiting for a result (null → 0.5), then normal (0).
        query = query.order_by(func.coalesce(flags.c.abnormal, 0.5).desc(), Study.last_received_at.desc())
    else:
        query = query.order_by(Study.last_received_at.desc(), Study.id.desc())
    rows = session.execute(query.limit(limit).offset(offset)).all()
    jobs_of = _study_jobs(session, [row[0].id for row in rows])
    items = [
        _study_summary(study, abnormal, max_score, n_series, jobs_of.get(study.id, []))
        for study, abnormal, max_score, _jobs, n_series in rows
    ]
    return StudyPage(total=int(total or 0), limit=limit, offset=offset, items=items)


def _study_jobs(session: Session, study_ids: list[int]) -> dict[int, list[JobBrief]]:
    """The jobs of the given studies (one query for a page of studies)."""
    if not study_ids:
        return {}
    result: dict[int, list[JobBrief]] = defaultdict(list)
    rows = session.execute(
        select(Job.study_id, Job.id, Job.detector, Job.state, Job.is_abnormal, Job.series_score)
        .where(Job.study_id.in_(study_ids))
        .order_by(Job.id)
    ).all()
    for study_id, job_id, detector, state, is_abnormal, score in rows:
        result[study_id].append(
            JobBrief(
                id=job_id, detector=detector, state=_state_name(state), is_abnormal=is_abnormal, series_score=score
            )
        )
    return result


def _state_name(state: object) -> str:
    return str(state.value if isinstance(state, enum.Enum) else state)


def _study_summary(
    study: Study,
    abnormal: int | None,
    max_score: float | None,
    n_series: int | None,
    jobs: list[JobBrief],
) -> StudySummary:
    job_states: dict[str, int] = defaultdict(int)
    for job in jobs:
        job_states[job.state] += 1
    return StudySummary(
        id=study.id,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        modalities=study.modalities,
        calling_ae_title=study.calling_ae_title,
        state=_state_name(study.state),
        first_received_at=utc(study.first_received_at),
        last_received_at=utc(study.last_received_at),
        completed_at=utc_or_none(study.completed_at),
        completion_reason=study.completion_reason,
        needs_reprocessing=bool(study.needs_reprocessing),
        interrupted_at=utc_or_none(study.interrupted_at),
        interruption_reason=study.interruption_reason,
        instance_count=study.instance_count or 0,
        series_count=int(n_series or 0),
        job_count=len(jobs),
        job_states=dict(job_states),
        abnormal=None if abnormal is None else bool(abnormal),
        max_score=max_score,
        jobs=jobs,
    )


def get_study(session: Session, study_instance_uid: str) -> StudyDetail:
    """One study with its series (routing decisions) and jobs."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise NotFound(f"study {study_instance_uid} not found")
    flags = _study_flags()
    flag_row = session.execute(select(flags.c.abnormal, flags.c.max_score).where(flags.c.study_id == study.id)).first()
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))
    jobs = list_jobs(session, JobFilter(study_instance_uid=study_instance_uid), limit=MAX_LIMIT).items
    summary = _study_summary(
        study,
        flag_row[0] if flag_row else None,
        flag_row[1] if flag_row else None,
        len(series),
        _study_jobs(session, [study.id]).get(study.id, []),
    )
    return StudyDetail(
        **summary.model_dump(exclude={"jobs"}),
        series=[_series_summary(s, study.study_instance_uid) for s in series],
        jobs=sorted(jobs, key=lambda j: j.id),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Timeline


def _step(steps: list[TimelineStep], name: str, at: datetime | None, detail: str | None = None) -> None:
    if at is not None:
        steps.append(TimelineStep(name=name, at=utc(at), detail=detail))


def job_timeline(session: Session, job_id: int) -> JobTimeline:
    """A job's milestones (received → last received → complete → queued → started → finished → each delivery
    attempt → delivered) with the time each took, plus its raw events, delivery attempts and result objects."""
    summary = get_job(session, job_id)
    job = session.get(Job, job_id)
    assert job is not None  # get_job raised NotFound otherwise
    first_received, last_received = session.execute(
        select(func.min(Instance.received_at), func.max(Instance.received_at)).where(
            Instance.series_id == job.series_id
        )
    ).one()
    complete_at = job.study_completed_at or job.study.completed_at
    events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.at, JobEvent.id)))
    deliveries = list(
        session.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.job_id == job_id).order_by(DeliveryAttempt.started_at)
        )
    )
    results = list(session.scalars(select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id)))

    steps: list[TimelineStep] = []
    _step(steps, "received", first_received, "first instance of the series")
    if last_received is not None and first_received is not None and last_received != first_received:
        _step(steps, "last_received", last_received, "last instance of the series")
    _step(steps, "complete", complete_at, job.study.completion_reason)
    _step(steps, "queued", job.queued_at or job.created_at, f"attempt {job.attempts}" if job.attempts else None)
    _step(steps, "started", job.started_at, job.worker)
    finished_detail = summary.state if job.finished_at is not None else None
    if job.state == JobState.FAILED and job.error:
        finished_detail = f"failed: {job.error}"
    elif job.series_score is not None:
        verdict = "abnormal" if job.is_abnormal else "normal"
        finished_detail = f"{verdict}, score {job.series_score:.4g}"
    _step(steps, "finished", job.finished_at, finished_detail)
    for attempt in deliveries:
        status = f" status 0x{attempt.status:04X}" if attempt.status is not None and attempt.status < 0x10000 else ""
        text = f"{attempt.destination} #{attempt.attempt}: {attempt.outcome}{status}"
        if attempt.detail:
            text += f" ({attempt.detail})"
        _step(steps, "delivery", attempt.finished_at or attempt.started_at, text)
    _step(steps, "delivered", job.delivered_at)
    if job.state == JobState.DELIVERY_FAILED and job.error:
        last = max((s.at for s in steps), default=None)
        _step(steps, "delivery_failed", last, job.error)

    # Stable sort keeps the logical order for equal timestamps.
    steps.sort(key=lambda s: s.at)
    first_at = steps[0].at if steps else None
    previous: datetime | None = None
    for step in steps:
        step.seconds_since_previous = seconds(step.at, previous)
        step.seconds_since_first = seconds(step.at, first_at)
        previous = step.at

    result_at = job.delivered_at or job.finished_at
    durations = Durations(
        receive_to_complete=seconds(complete_at, last_received),
        queue_wait=seconds(job.started_at, job.queued_at or job.created_at),
        run=seconds(job.finished_at, job.started_at),
        delivery=seconds(job.delivered_at, job.finished_at),
        complete_to_result=seconds(result_at, complete_at) if job.state != JobState.FAILED else None,
        receive_to_pacs=seconds(job.delivered_at, last_received),
    )
    return JobTimeline(
        job=summary,
        steps=steps,
        durations=durations,
        events=[
            JobEventOut(at=utc(e.at), event=e.event, from_state=e.from_state, to_state=e.to_state, detail=e.detail)
            for e in events
        ],
        deliveries=[
            DeliveryAttemptOut(
                destination=d.destination,
                attempt=d.attempt,
                started_at=utc(d.started_at),
                finished_at=utc_or_none(d.finished_at),
                seconds=seconds(d.finished_at, d.started_at),
                outcome=d.outcome,
                status=d.status,
                detail=d.detail,
            )
            for d in deliveries
        ],
        results=[
            ResultObjectOut(
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                created_at=utc(r.created_at),
            )
            for r in results
        ],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class _JobTimes:
    detector: str
    state: str
    is_abnormal: bool | None
    series_score: float | None
    completed_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    delivered_at: datetime | None

    @property
    def result_at(self) -> datetime | None:
        return self.delivered_at or self.finished_at

    @property
    def latency(self) -> float | None:
        """Study complete → results (delivered, or finished when nothing is delivered)."""
        if self.state == JobState.FAILED.value:
            return None
        return seconds(self.result_at, self.completed_at)


def _job_times(session: Session, since: datetime, until: datetime) -> list[_JobTimes]:
    """Jobs created, finished or delivered in [since, until) (only the columns the statistics need)."""
    since, until = utc(since), utc(until)
    in_window = or_(
        and_(Job.created_at >= since, Job.created_at < until),
        and_(Job.finished_at >= since, Job.finished_at < until),
    )
    rows = session.execute(
        select(
            Job.detector,
            Job.state,
            Job.is_abnormal,
            Job.series_score,
            func.coalesce(Job.study_completed_at, Job.queued_at, Job.created_at),
            Job.started_at,
            Job.finished_at,
            Job.delivered_at,
        )
        .where(in_window)
        .where(Job.state != JobState.SUPERSEDED)
    ).all()
    return [
        _JobTimes(
            detector=row[0],
            state=str(row[1].value if isinstance(row[1], JobState) else row[1]),
            is_abnormal=row[2],
            series_score=row[3],
            completed_at=utc_or_none(row[4]),
            started_at=utc_or_none(row[5]),
            finished_at=utc_or_none(row[6]),
            delivered_at=utc_or_none(row[7]),
        )
        for row in rows
    ]


def stats(session: Session, since: datetime, until: datetime | None = None) -> Stats:
    """Counts, abnormal rate and p50/p95 latency per detector for jobs in [since, until)."""
    until = utc(until or datetime.now(UTC))
    since = utc(since)
    per_detector: dict[str, list[_JobTimes]] = defaultdict(list)
    for times in _job_times(session, since, until):
        per_detector[times.detector].append(times)
    detectors = []
    for name in sorted(per_detector):
        jobs = per_detector[name]
        by_state: dict[str, int] = defaultdict(int)
        for j in jobs:
            by_state[j.state] += 1
        with_result = [j for j in jobs if j.is_abnormal is not None]
        abnormal = sum(1 for j in with_result if j.is_abnormal)
        latencies = [v for v in (j.latency for j in jobs) if v is not None]
        runs = [v for v in (seconds(j.finished_at, j.started_at) for j in jobs) if v is not None]
        detectors.append(
            DetectorStats(
                detector=name,
                jobs=len(jobs),
                by_state=dict(by_state),
                with_result=len(with_result),
                abnormal=abnormal,
                abnormal_rate=abnormal / len(with_result) if with_result else None,
                failed=sum(by_state.get(s, 0) for s in FAILED_STATES),
                latency_p50=percentile(latencies, 0.5),
                latency_p95=percentile(latencies, 0.95),
                run_p50=percentile(runs, 0.5),
                run_p95=percentile(runs, 0.95),
            )
        )
    studies = session.scalar(
        select(func.count(Study.id)).where(Study.last_received_at >= since, Study.first_received_at < until)
    )
    instances = session.scalar(
        select(func.count(Instance.id)).where(Instance.received_at >= since, Instance.received_at < until)
    )
    return Stats(
        since=since,
        until=until,
        studies_received=int(studies or 0),
        instances_received=int(instances or 0),
        jobs=sum(d.jobs for d in detectors),
        detectors=detectors,
    )


def throughput(
    session: Session, since: datetime, until: datetime | None = None, bucket: timedelta = timedelta(hours=1)
) -> Throughput:
    """Per detector and time bucket: jobs that finished detection, and their median study complete → results.
    ValueError when the period holds more than ``MAX_BUCKETS`` buckets."""
    until = utc(until or datetime.now(UTC))
    since = utc(since)
    width = max(bucket.total_seconds(), 1.0)
    # Rounded, so "24h" in 1 h buckets is 24 buckets although ``until`` is read a moment after ``since``; the last
    # bucket runs to ``until``.
    n_buckets = max(1, round((until - since).total_seconds() / width))
    if n_buckets > MAX_BUCKETS:
        raise ValueError(
            f"{n_buckets} buckets of {int(width)} s in this period; at most {MAX_BUCKETS}: use a wider bucket"
        )
    starts = [since + timedelta(seconds=i * width) for i in range(n_buckets)]
    finished: dict[str, list[int]] = defaultdict(lambda: [0] * n_buckets)
    latencies: dict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in range(n_buckets)])
    for times in _job_times(session, since, until):
        if times.finished_at is None or not since <= times.finished_at < until:
            continue
        index = min(int((times.finished_at - since).total_seconds() // width), n_buckets - 1)
        finished[times.detector][index] += 1
        if times.latency is not None:
            latencies[times.detector][index].append(times.latency)
    return Throughput(
        since=since,
        bucket_seconds=int(width),
        buckets=starts,
        detectors=[
            ThroughputSeries(
                detector=name,
                finished=finished[name],
                latency_p50=[percentile(values, 0.5) for values in latencies[name]],
            )
            for name in sorted(finished)
        ],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Queue depth and expected wait

RECENT_RUNS = 20  # finished runs per detector the expected wait is estimated from


def queue_status(session: Session, settings: Settings, now: datetime | None = None) -> QueueReport:
    """Per detector: queue depth, running jobs, live workers consuming the queue, and the expected wait of a job
    queued now (docs/workers.md, "Queue depth and expected wait").

    expected wait = (time left of the running jobs + queued × median run) / live pool processes, where the median
    run is that of the detector's last ``RECENT_RUNS`` finished runs (started → finished), a running job's time
    left is the median run less the time it has run (at least 0), and the pool processes are those of the live
    workers (heartbeats) whose queues include the detector's."""
    now = utc(now or datetime.now(UTC))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for detector, state, backing_off, n in session.execute(
        select(
            Job.detector,
            Job.state,
            and_(Job.next_attempt_at.is_not(None), Job.next_attempt_at > now),
            func.count(Job.id),
        )
        .where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .group_by(Job.detector, Job.state, and_(Job.next_attempt_at.is_not(None), Job.next_attempt_at > now))
    ).all():
        name = _state_name(state)
        counts[detector][name] += int(n)
        if name == JobState.QUEUED.value and backing_off:
            counts[detector]["waiting_retry"] += int(n)
    enabled = [name for name, detector in settings.detectors.items() if detector.enabled]
    alive = Liveness.load(session, settings, now).alive()
    detectors = []
    for name in sorted(set(enabled) | set(counts)):
        running_since = [
            utc(started)
            for started in session.scalars(
                select(Job.started_at).where(Job.detector == name, Job.state == JobState.RUNNING)
            )
            if started is not None
        ]
        runs = [
            value
            for started, finished in session.execute(
                select(Job.started_at, Job.finished_at)
                .where(Job.detector == name, Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .where(Job.state != JobState.SUPERSEDED)
                .order_by(Job.finished_at.desc())
                .limit(RECENT_RUNS)
            ).all()
            if (value := seconds(finished, started)) is not None and value >= 0
        ]
        consumers = [row for row in alive if name in (row.queues or "").split(",")]
        processes = sum(max(len(_json_list(row.processes)), 1) for row in consumers)
        queued = counts[name][JobState.QUEUED.value]
        run_p50 = percentile(runs, 0.5)
        wait: float | None = None
        note = None
        if not consumers:
            note = "no live worker consumes this queue"
        elif run_p50 is None:
            note = "no finished run to estimate from yet"
        else:
            left = sum(max(run_p50 - (now - started).total_seconds(), 0.0) for started in running_since)
            wait = (left + queued * run_p50) / processes
        detectors.append(
            QueueStatus(
                detector=name,
                queued=queued,
                waiting_retry=counts[name]["waiting_retry"],
                running=counts[name][JobState.RUNNING.value],
                workers=sorted(row.name for row in consumers),
                worker_processes=processes if consumers else 0,
                recent_runs=len(runs),
                run_p50=run_p50,
                expected_wait=wait,
                note=note,
            )
        )
    return QueueReport(at=now, detectors=detectors)


def _json_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []
