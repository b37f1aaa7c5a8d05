"""``dicom-node jobs list | show | retry``: the job database's detection jobs, newest first; retry a failed one."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from sqlalchemy import select

from dicom_node.admin import queries
from dicom_node.cli import add_admin_arguments, bounded_int, settings_from
from dicom_node.cli._table import dump_json, iso, table
from dicom_node.cli.job_show import add_show_command, job_id_argument
from dicom_node.db import Database, Job, JobState, Series, Study
from dicom_node.timeutil import parse_time

EXIT_REFUSED = 1
QUOTES = "'\""  # str(KeyError) quotes its message


def register(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="query detection jobs")
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = commands.add_parser("list", help="list jobs, newest first")
    add_admin_arguments(listing, "JSON instead of a table")
    listing.add_argument(
        "--status",
        choices=[s.value for s in JobState],
        help="only jobs in this state; failed: every failure (failed in detection, and delivery_failed)",
    )
    listing.add_argument(
        "--since", type=_since, help="only jobs created since: a duration back from now (30m, 2h, 1d) or an ISO time"
    )
    listing.add_argument(
        "--limit", type=bounded_int(1, 1_000_000), default=200, help="at most this many rows (default 200)"
    )
    listing.set_defaults(func=list_jobs)
    add_show_command(commands)
    retry = commands.add_parser(
        "retry",
        help="queue a failed job again (detection failed: run again; delivery failed: deliver again)",
        description="Do again what failed, as POST /api/jobs/ID/retry and the web page do: a job whose detection "
        "failed is queued for detection again; a delivery_failed job's results are delivered again.",
    )
    add_admin_arguments(retry, "JSON (the same document as POST /api/jobs/ID/retry)")
    job_id_argument(retry)
    retry.add_argument("--broker", default=None, help="broker URL (default: broker.url, or the embedded broker)")
    retry.set_defaults(func=retry_job_command)


def _since(text: str) -> Any:
    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def job_rows(db: Database, status: str | None, since: datetime | None, limit: int) -> list[dict[str, Any]]:
    """Jobs newest first; ``status`` as the API's state filter (``failed`` includes ``delivery_failed``)."""
    query = (
        select(Job, Study.study_instance_uid, Series.series_instance_uid)
        .join(Study, Job.study_id == Study.id)
        .join(Series, Job.series_id == Series.id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Job.state.in_(queries.job_states_filter([status])))
    if since is not None:
        query = query.where(Job.created_at >= since)
    with db.session() as session:
        return [
            {
                "id": job.id,
                "state": job.state.value,
                "detector": job.detector,
                "model_version": job.model_version,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "attempts": job.attempts,
                "created_at": iso(job.created_at),
                "finished_at": iso(job.finished_at),
                "series_score": job.series_score,
                "is_abnormal": job.is_abnormal,
                "error": job.error,
            }
            for job, study_uid, series_uid in session.execute(query).all()
        ]


def list_jobs(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    db = Database(settings.database_url)
    try:
        rows = job_rows(db, args.status, args.since, args.limit)
    finally:
        db.dispose()
    if args.json:
        print(dump_json(rows))
        return 0
    if not rows:
        print("no jobs")
        return 0
    headers = ["ID", "STATE", "DETECTOR", "CREATED", "SCORE", "ABNORMAL", "STUDY", "SERIES"]
    print(
        table(
            headers,
            [
                [
                    r["id"],
                    r["state"],
                    r["detector"],
                    (r["created_at"] or "-").replace("T", " ")[:19],
                    r["series_score"],
                    r["is_abnormal"],
                    r["study_instance_uid"],
                    r["series_instance_uid"],
                ]
                for r in rows
            ],
        )
    )
    return 0


def retry_job_command(args: argparse.Namespace) -> int:
    """``dicom-node jobs retry JOB_ID``: the API's retry action (``JobActions.retry_job``) over the configured
    broker; exit 1 when the job does not exist or is not in a state that can be retried."""
    settings = settings_from(args, {"broker": {"url": args.broker}} if args.broker else None)
    from dicom_node.admin.actions import ActionError, JobActions
    from dicom_node.admin.schemas import ActionResult
    from dicom_node.workers.app import CeleryDispatcher, create_app
    from dicom_node.workers.versions import model_card_versions

    db = Database(settings.database_url)
    app = create_app(settings)
    try:
        with db.session() as session:
            before = session.scalar(select(Job.state).where(Job.id == args.job_id))
        try:
            actions = JobActions(
                db, settings, CeleryDispatcher(app, settings), model_version=model_card_versions(settings)
            )
            actions.retry_job(args.job_id)
        except (ActionError, LookupError) as err:
            print(f"dicom-node: {str(err).strip(QUOTES)}", file=sys.stderr)
            return EXIT_REFUSED
        with db.session() as session:
            job = session.get(Job, args.job_id)
            assert job is not None  # retry_job raised LookupError otherwise
            attempts, sent = job.attempts, bool(job.broker_task_id)
    finally:
        app.close()
        db.dispose()
    if before == JobState.DELIVERY_FAILED:
        message = f"job {args.job_id}: delivery queued again (it was delivery_failed)"
    else:
        delivery = "sent to the workers" if sent else "the broker is unreachable; the sweeper will send it"
        message = f"job {args.job_id} queued again (attempt {attempts + 1}); {delivery}"
    if args.json:
        print(ActionResult(action="retry", job_ids=[args.job_id], detail=message).model_dump_json(indent=2))
    else:
        print(message)
    return 0
