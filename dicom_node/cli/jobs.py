"""``dicom-node jobs list``: the job database's detection jobs, newest first."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from sqlalchemy import select

from dicom_node.cli import add_config_argument, settings_from
from dicom_node.cli._table import dump_json, iso, parse_duration, table
from dicom_node.cli.job_show import add_show_command
from dicom_node.db import Database, Job, JobState, Series, Study
from dicom_node.db.models import utcnow


def register(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="query detection jobs")
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = commands.add_parser("list", help="list jobs, newest first")
    add_config_argument(listing)
    listing.add_argument("--status", choices=[s.value for s in JobState], help="only jobs in this state")
    listing.add_argument("--since", type=_duration, help="only jobs created within this duration (30m, 2h, 1d)")
    listing.add_argument("--limit", type=int, default=200, help="at most this many rows (default 200)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=list_jobs)
    add_show_command(commands)
    retry = commands.add_parser("retry", help="queue a failed job again")
    add_config_argument(retry)
    retry.add_argument("job_id", type=int, metavar="JOB_ID")
    retry.add_argument("--broker", default=None, help="broker URL (default: broker.url, or the embedded broker)")
    retry.set_defaults(func=retry_job_command)


def _duration(text: str) -> Any:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def job_rows(db: Database, status: str | None, since: datetime | None, limit: int) -> list[dict[str, Any]]:
    query = (
        select(Job, Study.study_instance_uid, Series.series_instance_uid)
        .join(Study, Job.study_id == Study.id)
        .join(Series, Job.series_id == Series.id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Job.state == JobState(status))
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
        since = utcnow() - args.since if args.since else None
        rows = job_rows(db, args.status, since, args.limit)
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
    """``dicom-node jobs retry JOB_ID``: failed → queued, and a message to the workers; exit 1 when not allowed."""
    settings = settings_from(args, {"broker": {"url": args.broker}} if args.broker else None)
    from dicom_node.jobs import JobStateError, retry_job
    from workers.app import CeleryDispatcher, create_app

    db = Database(settings.database_url)
    app = create_app(settings)
    try:
        job = retry_job(db, CeleryDispatcher(app, settings), args.job_id)
    except JobStateError as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        return 1
    finally:
        app.close()
        db.dispose()
    sent = "sent to the workers" if job.broker_task_id else "the broker is unreachable; the sweeper will send it"
    print(f"job {job.id} queued again (attempt {job.attempts + 1}); {sent}")
    return 0
