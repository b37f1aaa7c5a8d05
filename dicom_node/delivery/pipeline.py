"""Deliver one job's results: build the objects each destination wants, store them, send them, record everything.

``deliver_job`` is idempotent and resumable: result objects have deterministic UIDs (a re-run writes the same files
and adds no second ResultObject row), a destination that already stored the results is not sent to again, and a
destination that refused them for good is not retried. Each call makes at most one attempt per pending
destination; the caller (the Celery task) re-schedules itself for the time the report names.

One call goes through named steps: ``_load`` (the job, its detection result — the detection's in-memory hand-over
when this process kept it — and what the job database says: source files, triage event, earlier SRs, attempts so
far), ``_plan`` (the targets still to send to), ``_build`` (the source headers read once, every requested object
built once and written, whatever the number of targets), ``_attempt`` for each pending target (one send through
the destination interface, ``dicom_node.delivery.destinations``, or one webhook POST, recorded) and ``_finish``.

Job states: succeeded → delivered (every destination stored, with or without warning) or delivery_failed (one
refused for good, or ran out of attempts). Every attempt is a DeliveryAttempt row; state changes are JobEvent rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import Destination, Settings, Webhook
from dicom_node.db import Database
from dicom_node.db.models import DeliveryAttempt, Instance, Job, JobEvent, JobState, ResultObject
from dicom_node.delivery import handover
from dicom_node.delivery.destinations import DestinationType, destination_type, known_kinds, open_destination
from dicom_node.delivery.transfer import DONE, ResultFile, SendOutcome
from dicom_node.delivery.webhook import TriageEvent, post_event
from dicom_node.jobs.lifecycle import DELIVERABLE_STATES, JobStateError, move
from dicom_node.models.base import ModelIdentity, SeriesResult
from dicom_node.results.build import BuiltObjects, ObjectRequest, build_results
from dicom_node.timeutil import seconds

log = logging.getLogger(__name__)

WEBHOOK_BACKOFF_INITIAL = 2.0
WEBHOOK_BACKOFF_MAX = 300.0


@dataclass
class DeliveryReport:
    """What one ``deliver_job`` call did and what is left: ``retry_in_seconds`` None means nothing to retry."""

    job_id: int
    state: str
    objects: dict[str, str] = field(default_factory=dict)  # kind key → file path
    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retry: dict[str, float] = field(default_factory=dict)  # target → seconds until the next attempt
    seconds_complete_to_stored: float | None = None
    skipped_reason: str | None = None

    @property
    def retry_in_seconds(self) -> float | None:
        return min(self.retry.values()) if self.retry else None


@dataclass(frozen=True, eq=False)
class _Target:
    """A destination (DICOM files, through its type) or a webhook (the triage event), named as in
    DeliveryAttempt.destination."""

    name: str
    destination: DestinationType | None = None
    webhook: Webhook | None = None

    @property
    def max_attempts(self) -> int:
        if self.destination is not None:
            return self.destination.config.max_attempts
        assert self.webhook is not None
        return self.webhook.max_attempts

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: initial × 2^(attempt-1), capped."""
        if self.destination is not None:
            config = self.destination.config
            initial, cap = config.backoff_initial_seconds, config.backoff_max_seconds
        else:
            initial, cap = WEBHOOK_BACKOFF_INITIAL, WEBHOOK_BACKOFF_MAX
        return float(min(cap, initial * 2 ** max(0, attempt - 1)))

    def requests(self) -> list[ObjectRequest]:
        """The objects this target receives: its destination profile's; none for a webhook."""
        return _requests(self.destination.config) if self.destination is not None else []


@dataclass(frozen=True)
class _Loaded:
    """What one delivery works from, read once: the detection result and the job database's part."""

    state: str
    result: SeriesResult
    kept: handover.Handover | None  # the detection's hand-over, when this process kept it
    paths: dict[str, str]  # source SOP Instance UID → spool file
    triage: TriageEvent
    predecessors: list[Dataset]
    history: dict[str, list[DeliveryAttempt]]  # target name → its attempts so far
    completed_at: datetime | None


@dataclass(frozen=True)
class _Built:
    """The objects built for this delivery, as written (by ObjectRequest.key), and the triage event naming the
    findings they show."""

    files: dict[str, ResultFile]
    triage: TriageEvent


def _requests(destination: Destination) -> list[ObjectRequest]:
    profile = destination.profile
    return [ObjectRequest(kind, profile.keep_empty_frames if kind == "SEG" else True) for kind in profile.objects]


def _event(session: Session, job: Job, event: str, detail: str, to_state: JobState | None = None) -> None:
    """Record a delivery event, with its state change where ``to_state`` is given (only the lifecycle's
    compare-and-set writes Job.state). A job that moved on while it was delivered (re-run, superseded) keeps its new
    state: the event is still recorded, with the attempts of this delivery, and says so."""
    if to_state is not None:
        try:
            if move(session, job, to_state, event, detail=detail):
                return
        except JobStateError as err:
            log.warning("job %d: %s, but the job has moved on (%s); its state is left as it is", job.id, event, err)
        detail = f"{detail}; not {to_state}: the job had moved on while it was delivered"
    session.add(JobEvent(job_id=job.id, from_state=str(job.state), to_state=str(job.state), event=event, detail=detail))


def _attempts(session: Session, job_id: int) -> dict[str, list[DeliveryAttempt]]:
    rows = session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job_id).order_by(DeliveryAttempt.id))
    by_target: dict[str, list[DeliveryAttempt]] = {}
    for row in rows:
        by_target.setdefault(row.destination, []).append(row)
    return by_target


def _trailing_retries(attempts: Sequence[DeliveryAttempt]) -> int:
    """Attempts in the current round: the retries since the last stored/failed outcome (or since the start)."""
    count = 0
    for row in reversed(attempts):
        if row.outcome != "retry":
            break
        count += 1
    return count


def _predecessor_srs(session: Session, job: Job) -> list[Dataset]:
    """Earlier SRs of this series (the job this one re-runs), for the Predecessor Documents Sequence."""
    if job.predecessor_job_id is None:
        return []
    rows = session.scalars(
        select(ResultObject).where(ResultObject.job_id == job.predecessor_job_id, ResultObject.kind == "SR")
    )
    return [pydicom.dcmread(row.file_path, stop_before_pixels=True) for row in rows if Path(row.file_path).exists()]


def _headers(uids: Sequence[str], paths: dict[str, str], kept: handover.Handover | None) -> list[Dataset]:
    """The source instances' headers, in the result's order: from the detection's hand-over when it has them all,
    else read from the spool."""
    if kept is not None and all(uid in kept.headers for uid in uids):
        return [kept.headers[uid] for uid in uids]
    return [pydicom.dcmread(paths[uid], stop_before_pixels=True) for uid in uids]


def _write(dataset: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    dataset.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def _result_file(dataset: Dataset, path: Path) -> ResultFile:
    """What the File Meta Information of ``path``, just written from ``dataset``, says, known without reading it
    back: writing with ``enforce_file_format`` copies the data set's SOP Class and Instance UIDs into the Media
    Storage ones (PS3.10 7.1) and keeps the transfer syntax the data set names."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:  # pydicom chose one from the data set's encoding when writing: the file says which
        syntax = read_file_meta_info(path).TransferSyntaxUID
    return ResultFile(path, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(syntax))


def _record_objects(session: Session, job: Job, objects: dict[str, Dataset], directory: Path) -> dict[str, ResultFile]:
    files: dict[str, ResultFile] = {}
    for key, dataset in objects.items():
        path = directory / f"{key}.dcm"
        _write(dataset, path)
        files[key] = _result_file(dataset, path)
        uid = str(dataset.SOPInstanceUID)
        row = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == uid))
        if row is None:
            session.add(
                ResultObject(
                    job_id=job.id,
                    kind=key.split("-", 1)[0],
                    sop_class_uid=str(dataset.SOPClassUID),
                    sop_instance_uid=uid,
                    series_instance_uid=str(dataset.SeriesInstanceUID),
                    file_path=str(path),
                )
            )
    return files


def _targets(settings: Settings, abnormal: bool) -> list[_Target]:
    targets = [_Target(f"webhook:{hook.url}"[:128], webhook=hook) for hook in settings.webhooks] if abnormal else []
    targets += [
        _Target(dest.name[:128], destination=open_destination(dest, settings)) for dest in settings.destinations
    ]
    return targets


def _store(destination: DestinationType, files: Sequence[ResultFile]) -> SendOutcome:
    """One attempt at a destination: send the files, then, when the destination commits, ask it to (Storage
    Commitment, PS3.4 Annex J). Stored and committed is the send's outcome with both details; a commitment refused
    or unanswered is the attempt's outcome (the files go again with the same UIDs on the retry)."""
    stored = destination.send(files)
    if stored.outcome not in DONE or not destination.commits:
        return stored
    committed = destination.commit(files)
    if committed.outcome in DONE:
        return SendOutcome(stored.outcome, stored.status, f"{stored.detail}; {committed.detail}")
    return committed


def _send(target: _Target, files: Sequence[ResultFile], event: TriageEvent) -> SendOutcome:
    if target.webhook is not None:
        return post_event(target.webhook, event)
    assert target.destination is not None
    return _store(target.destination, files)


def _load_result(db: Database, job_id: int) -> tuple[SeriesResult, handover.Handover | None] | DeliveryReport:
    """The job's detection result, or the report of why there is nothing to deliver (the job failed when its
    result cannot be read)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return DeliveryReport(job_id, "missing", skipped_reason=f"job {job_id} does not exist")
        if job.state not in DELIVERABLE_STATES or not job.result_path:
            return DeliveryReport(job_id, str(job.state), skipped_reason=f"job is {job.state}, nothing to deliver")
        problem: str | None = None
        # The detection that just ran in this process left its result and headers here: no need to read them back.
        kept = handover.take(job_id, job.result_path)
        try:
            result = kept.result if kept is not None else SeriesResult.load(Path(job.result_path))
        except (OSError, ValueError, KeyError) as err:
            problem = f"cannot read the detection result at {job.result_path}: {type(err).__name__}: {err}"
    if problem is not None:
        log.error("job %s: %s", job_id, problem)
        return _fail(db, job_id, DeliveryReport(job_id, "failed"), problem)
    return result, kept


def _load(db: Database, job_id: int) -> _Loaded | DeliveryReport:
    """Step 1: the job and its result, then the source files, the triage event, the SRs this job's replace and
    the attempts so far, from one session."""
    loaded = _load_result(db, job_id)
    if isinstance(loaded, DeliveryReport):
        return loaded
    result, kept = loaded
    with db.session() as session:
        job = session.get_one(Job, job_id)
        instances = session.scalars(
            select(Instance).where(Instance.sop_instance_uid.in_(result.sop_instance_uids))
        ).all()
        study = job.study
        completed_at = job.study_completed_at or study.completed_at
        triage = TriageEvent(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=job.series.series_instance_uid,
            accession_number=study.accession_number,
            detector=result.model.detector,
            model_version=result.model.version,
            score=float(result.series_score),
            threshold=float(result.image_threshold),
            abnormal=result.is_abnormal,
            finding="anomaly above the calibrated threshold" if result.is_abnormal else "none",
            job_id=job.id,
            study_completed_at=completed_at.isoformat() if completed_at else None,
        )
        return _Loaded(
            state=str(job.state),
            result=result,
            kept=kept,
            paths={row.sop_instance_uid: row.file_path for row in instances},
            triage=triage,
            predecessors=_predecessor_srs(session, job),
            history=_attempts(session, job.id),
            completed_at=completed_at,
        )


def _plan(
    job_id: int, loaded: _Loaded, targets: Sequence[_Target], force: bool
) -> tuple[list[_Target], DeliveryReport]:
    """Step 2: the targets to send to now (never tried, or last told to retry; all of them when ``force``) and a
    report that already names the others' last outcome."""
    history = loaded.history
    pending = [t for t in targets if force or not history.get(t.name) or history[t.name][-1].outcome == "retry"]
    report = DeliveryReport(job_id, loaded.state)
    for target in targets:
        last = history.get(target.name, [])
        if target in pending or not last:
            continue
        if last[-1].outcome in DONE:
            report.stored.append(target.name)
        else:
            report.failed[target.name] = last[-1].detail or "failed"
    return pending, report


def _with_findings(triage: TriageEvent, built: BuiltObjects, abnormal: bool) -> TriageEvent:
    """The triage event naming the strongest of the regions found, when the result is abnormal and has some."""
    if not (built.findings.findings and abnormal):
        return triage
    strongest = built.findings.findings[0]
    where = (
        "above the pixel threshold"
        if strongest.above_threshold
        else "around the evidence of the score (no pixel above the pixel threshold)"
    )
    return replace(
        triage,
        finding=f"{len(built.findings.findings)} region(s) {where}; strongest "
        f"'{strongest.label}' score {strongest.max_score:.4g}, {strongest.size} "
        f"{'voxels' if built.source.is_volume else 'pixels'}, {strongest.size_mm:.0f} mm across",
    )


def _build(
    db: Database,
    settings: Settings,
    job_id: int,
    loaded: _Loaded,
    pending: Sequence[_Target],
    report: DeliveryReport,
    began: float,
) -> _Built | DeliveryReport:
    """Step 3: the objects every pending target wants, built once from headers read once (the hand-over's when
    it has them all, else the spool's), written under ``results_dir`` and recorded as ResultObject rows; the
    failure report when they cannot be built (a source file gone from the spool does not heal by retrying)."""
    loaded_at = time.perf_counter()
    result, paths = loaded.result, loaded.paths
    requests = [r for t in pending for r in t.requests()]
    # Webhooks need no objects, but their event names the findings, so the regions are found for them too.
    if not requests and not any(t.webhook is not None for t in pending):
        return _Built({}, loaded.triage)
    missing = [uid for uid in result.sop_instance_uids if uid not in paths]
    if missing:
        reason = f"{len(missing)} source instance(s) not in the database, e.g. {missing[0]}"
        return _fail(db, job_id, report, reason)
    try:
        headers = _headers(result.sop_instance_uids, paths, loaded.kept)
        headed = time.perf_counter()
        built = build_results(
            headers,
            result,
            requests,
            read_pixels=lambda ds: pydicom.dcmread(paths[str(ds.SOPInstanceUID)]),
            predecessors=loaded.predecessors,
        )
    except (OSError, ValueError, InvalidDicomError) as err:
        # A source file gone from the spool or a broken hand-over will not heal by retrying: say so on the job.
        log.exception("job %s: could not build the result objects", job_id)
        return _fail(db, job_id, report, f"could not build the result objects: {type(err).__name__}: {err}")
    with db.session() as session:
        job = session.get_one(Job, job_id)
        directory = settings.results_dir / f"job-{job_id}" / "dicom"
        objects_built = time.perf_counter()
        files = _record_objects(session, job, built.objects, directory)
        done = time.perf_counter()
        if files:
            timing = (
                f"{'kept in memory: ' if loaded.kept is not None else ''}load {loaded_at - began:.2f} s, "
                f"headers {headed - loaded_at:.2f} s, build {objects_built - headed:.2f} s, "
                f"write {done - objects_built:.2f} s"
            )
            names = ", ".join(sorted(files))
            _event(session, job, "results_built", f"{names} in {done - began:.2f} s ({timing})")
    report.objects = {key: str(item.path) for key, item in files.items()}
    return _Built(files, _with_findings(loaded.triage, built, result.is_abnormal))


def _record_attempt(
    db: Database, job_id: int, target: str, attempt: int, started_at: datetime, outcome: SendOutcome
) -> None:
    with db.session() as session:
        session.add(
            DeliveryAttempt(
                job_id=job_id,
                destination=target,
                attempt=attempt,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                outcome=outcome.outcome,
                status=outcome.status,
                detail=outcome.detail,
            )
        )


def _attempt(
    db: Database,
    job_id: int,
    target: _Target,
    built: _Built,
    earlier: Sequence[DeliveryAttempt],
    report: DeliveryReport,
) -> None:
    """Step 4, for one pending target: one attempt, recorded, its outcome in ``report`` (a retry with the backoff
    of its round, or failed once the round has used ``max_attempts``)."""
    files: list[ResultFile] = []
    if target.destination is not None:
        files = [built.files[r.key] for r in target.requests() if r.key in built.files]
        if not files:
            report.stored.append(target.name)
            return
    attempt = len(earlier) + 1
    in_round = _trailing_retries(earlier) + 1
    started_at = datetime.now(UTC)
    outcome = _send(target, files, built.triage)
    if outcome.outcome == "retry" and in_round >= target.max_attempts:
        outcome = SendOutcome("failed", outcome.status, f"gave up after {in_round} attempts: {outcome.detail}")
    _record_attempt(db, job_id, target.name, attempt, started_at, outcome)
    log.info("job %s → %s attempt %d: %s (%s)", job_id, target.name, attempt, outcome.outcome, outcome.detail)
    if outcome.outcome in DONE:
        report.stored.append(target.name)
    elif outcome.outcome == "retry":
        report.retry[target.name] = target.backoff(in_round)
    else:
        report.failed[target.name] = outcome.detail


def deliver_job(db: Database, settings: Settings, job_id: int, *, force: bool = False) -> DeliveryReport:
    """Build, record and send the results of job ``job_id``; ``force`` re-sends to destinations that already
    stored or refused them (the admin's "redeliver")."""
    began = time.perf_counter()
    loaded = _load(db, job_id)
    if isinstance(loaded, DeliveryReport):
        return loaded
    pending, report = _plan(job_id, loaded, _targets(settings, loaded.result.is_abnormal), force)
    built = _build(db, settings, job_id, loaded, pending, report, began)
    if isinstance(built, DeliveryReport):
        return built
    for target in pending:
        _attempt(db, job_id, target, built, loaded.history.get(target.name, []), report)
    return _finish(db, job_id, report, loaded.completed_at)


def _fail(db: Database, job_id: int, report: DeliveryReport, reason: str) -> DeliveryReport:
    with db.session() as session:
        job = session.get_one(Job, job_id)
        job.error = reason
        _event(session, job, "delivery_failed", reason, JobState.DELIVERY_FAILED)
    report.state = str(JobState.DELIVERY_FAILED)
    report.failed["(build)"] = reason
    return report


def _finish(db: Database, job_id: int, report: DeliveryReport, completed_at: datetime | None) -> DeliveryReport:
    now = datetime.now(UTC)
    with db.session() as session:
        job = session.get_one(Job, job_id)
        if report.retry:
            job.next_attempt_at = now + timedelta(seconds=report.retry_in_seconds or 0)
            detail = "; ".join(f"{name} in {seconds:.0f} s" for name, seconds in report.retry.items())
            _event(session, job, "delivery_retry", f"next attempt: {detail}")
        elif report.failed:
            reason = "; ".join(f"{name}: {why}" for name, why in report.failed.items())
            job.error = reason[:4000]
            job.next_attempt_at = None
            if job.state != JobState.DELIVERY_FAILED:
                _event(session, job, "delivery_failed", reason, JobState.DELIVERY_FAILED)
        elif report.stored:
            job.next_attempt_at = None
            if job.state != JobState.DELIVERED:
                job.delivered_at = now
                report.seconds_complete_to_stored = seconds(now, completed_at)
                timing = (
                    f"; results stored {report.seconds_complete_to_stored:.1f} s after study complete"
                    if report.seconds_complete_to_stored is not None
                    else ""
                )
                _event(session, job, "delivered", f"stored at {', '.join(report.stored)}{timing}", JobState.DELIVERED)
        report.state = str(job.state)
    return report


def warm_up() -> None:
    """Build a SEG and an SR once for a made-up two-slice series, so that the first real delivery of a worker does
    not pay what the libraries do on first use (highdicom loads its tables of the standard: about a second), and
    load the destination types (their entry points and transport modules). The worker calls it before forking its
    pool (workers.delivery_tasks); nothing is written or sent."""
    for kind in known_kinds():
        destination_type(kind)
    size, count = 16, 2
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "WARMUP", "Warm^Up", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20000101", "000000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, index + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        headers.append(ds)
    maps = np.zeros((count, size, size), dtype=np.float32)
    maps[:, 4:12, 4:12] = 1.0
    result = SeriesResult(
        model=ModelIdentity("warm-up", "warm-up", "0", "0" * 64),
        series_score=1.0,
        image_threshold=0.5,
        pixel_threshold=0.5,
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers],
        image_scores=np.ones(count),
        anomaly_maps=maps,
        scored=np.ones(count, dtype=bool),
    )
    build_results(headers, result, [ObjectRequest("SEG"), ObjectRequest("SR")], read_pixels=lambda ds: ds)
