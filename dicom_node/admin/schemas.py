"""Shapes of what the admin API, the web page and ``--json`` CLI output return (one definition, OpenAPI from it).

Times are ISO 8601 in UTC; durations are seconds (float). No patient names or IDs: studies are named by their
Study Instance UID and accession number.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class JobSummary(BaseModel):
    """One detection job with the study and series it belongs to."""

    id: int
    study_id: int
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None = None
    calling_ae_title: str | None = None
    detector: str
    model_version: str | None = None
    state: str
    urgent: bool = False
    attempts: int = 0
    worker: str | None = None
    error: str | None = Field(None, description="reason of the last failure (detection or delivery)")
    series_score: float | None = None
    image_threshold: float | None = None
    is_abnormal: bool | None = Field(None, description="triage flag; null until the detector has run")
    study_completed_at: datetime | None = None
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    delivered_at: datetime | None = None
    predecessor_job_id: int | None = None


class JobPage(BaseModel):
    total: int = Field(description="number of jobs matching the filters, all pages together")
    limit: int
    offset: int
    items: list[JobSummary]


class SeriesSummary(BaseModel):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    instance_count: int = 0
    detector: str | None = Field(None, description="detector the series was routed to; null = ignored")
    routing_rule: str | None = None
    routing_reason: str | None = None
    routed_at: datetime | None = None


class SeriesPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[SeriesSummary]


class JobBrief(BaseModel):
    """A job as listed with its study."""

    id: int
    detector: str
    state: str
    is_abnormal: bool | None = None
    series_score: float | None = None


class StudySummary(BaseModel):
    id: int
    study_instance_uid: str
    accession_number: str | None = None
    modalities: str | None = None
    calling_ae_title: str | None = None
    state: str
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None = None
    completion_reason: str | None = None
    needs_reprocessing: bool = False
    interrupted_at: datetime | None = None  # an association delivering it ended without A-RELEASE (no resend since)
    interruption_reason: str | None = None
    instance_count: int = 0
    series_count: int = 0
    job_count: int = 0
    job_states: dict[str, int] = Field(default_factory=dict)
    abnormal: bool | None = Field(None, description="true if any job found the study abnormal; null = no result yet")
    max_score: float | None = None
    jobs: list[JobBrief] = Field(default_factory=list, description="the study's jobs, oldest first")


class StudyPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[StudySummary]


class StudyDetail(StudySummary):
    series: list[SeriesSummary] = Field(default_factory=list)
    jobs: list[JobSummary] = Field(default_factory=list)  # type: ignore[assignment]


class TimelineStep(BaseModel):
    """One milestone of a job, in time order; durations are from the previous milestone and from the first."""

    name: str = Field(description="received, last_received, complete, queued, started, finished, delivery, delivered")
    at: datetime
    seconds_since_previous: float | None = None
    seconds_since_first: float | None = None
    detail: str | None = None


class JobEventOut(BaseModel):
    at: datetime
    event: str
    from_state: str | None = None
    to_state: str | None = None
    detail: str | None = None


class DeliveryAttemptOut(BaseModel):
    destination: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float | None = None
    outcome: str
    status: int | None = Field(None, description="DIMSE status (e.g. 0 = success, 0xA700) or HTTP status")
    detail: str | None = None


class ResultObjectOut(BaseModel):
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    created_at: datetime


class Durations(BaseModel):
    """Stage durations in seconds; null when the stage has not happened."""

    receive_to_complete: float | None = Field(None, description="last instance received → study complete")
    queue_wait: float | None = Field(None, description="queued → started")
    run: float | None = Field(None, description="started → finished (detection)")
    delivery: float | None = Field(None, description="finished → delivered")
    complete_to_result: float | None = Field(None, description="study complete → delivered (or finished)")
    receive_to_pacs: float | None = Field(None, description="last instance received → delivered")


class JobTimeline(BaseModel):
    job: JobSummary
    steps: list[TimelineStep]
    durations: Durations
    events: list[JobEventOut]
    deliveries: list[DeliveryAttemptOut]
    results: list[ResultObjectOut]


class DetectorStats(BaseModel):
    detector: str
    jobs: int
    by_state: dict[str, int]
    with_result: int = Field(description="jobs whose detector ran to a score")
    abnormal: int
    abnormal_rate: float | None = Field(None, description="abnormal / with_result")
    failed: int = Field(description="jobs failed in detection or delivery")
    latency_p50: float | None = Field(None, description="study complete → results (delivered or finished), s")
    latency_p95: float | None = None
    run_p50: float | None = Field(None, description="detection run time, s")
    run_p95: float | None = None


class Stats(BaseModel):
    since: datetime
    until: datetime
    studies_received: int
    instances_received: int
    jobs: int
    detectors: list[DetectorStats]


class ThroughputSeries(BaseModel):
    detector: str
    finished: list[int] = Field(description="jobs that finished detection in each bucket")
    latency_p50: list[float | None] = Field(description="median study complete → results in each bucket, s")


class Throughput(BaseModel):
    since: datetime
    bucket_seconds: int
    buckets: list[datetime] = Field(description="start of each bucket")
    detectors: list[ThroughputSeries]


class QueueStatus(BaseModel):
    detector: str
    queued: int = Field(description="jobs waiting for a worker (queue depth), including those backing off")
    waiting_retry: int = Field(description="of the queued jobs, those waiting out a retry backoff")
    running: int
    workers: list[str] = Field(description="live workers consuming this detector's queue (heartbeats)")
    worker_processes: int = Field(description="their pool processes: jobs of this queue that can run at once")
    recent_runs: int = Field(description="finished runs the estimate is made from (at most the last 20)")
    run_p50: float | None = Field(None, description="median run time (started → finished) of those runs, s")
    expected_wait: float | None = Field(
        None,
        description="how long a job queued now would wait for a worker, s: (time left of the running jobs + "
        "queued × run_p50) / worker_processes; None when there is no live worker or no finished run to go by",
    )
    note: str | None = Field(None, description="why there is no estimate, when there is none")


class QueueReport(BaseModel):
    at: datetime
    detectors: list[QueueStatus]


class ActionResult(BaseModel):
    action: str
    job_ids: list[int] = Field(description="jobs queued (or re-queued for delivery) by the action")
    detail: str | None = None


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
