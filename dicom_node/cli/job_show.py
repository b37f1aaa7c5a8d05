"""``dicom-node jobs show JOB_ID``: one job with its timeline (the CLI twin of ``GET /api/jobs/{id}/timeline``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dicom_node.admin import queries
from dicom_node.admin.schemas import JobTimeline
from dicom_node.cli import add_admin_arguments, bounded_int, settings_from
from dicom_node.cli._table import short_time, table
from dicom_node.db import Database
from dicom_node.timeutil import format_seconds

EXIT_NOT_FOUND = 1


def add_show_command(commands: Any) -> None:
    """Adds ``show`` to the ``jobs`` command group (cli/jobs.py)."""
    show = commands.add_parser("show", help="one job: state, score, reason, and its timeline with durations")
    add_admin_arguments(show, "JSON (the same document as the REST API)")
    job_id_argument(show)
    show.set_defaults(func=show_job)


def job_id_argument(parser: argparse.ArgumentParser) -> None:
    """JOB_ID, a whole number the job database can compare (1 to 2^63 - 1)."""
    parser.add_argument("job_id", type=bounded_int(1, queries.MAX_ID), metavar="JOB_ID")


def show_job(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            timeline = queries.job_timeline(session, args.job_id)
    except queries.NotFound as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        db.dispose()
    if args.json:
        print(timeline.model_dump_json(indent=2))
    else:
        print(render(timeline))
    return 0


def render(timeline: JobTimeline) -> str:
    job, d = timeline.job, timeline.durations
    verdict = "-" if job.is_abnormal is None else "ABNORMAL" if job.is_abnormal else "normal"
    score = "-" if job.series_score is None else f"{job.series_score:.4f} (threshold {job.image_threshold})"
    lines = [
        f"job {job.id}: {job.detector} {job.model_version or ''}  state {job.state}  attempts {job.attempts}",
        f"  study   {job.study_instance_uid}  (accession {job.accession_number or '-'}, "
        f"from {job.calling_ae_title or '-'})",
        f"  series  {job.series_instance_uid}",
        f"  result  {verdict}, score {score}",
    ]
    if job.error:
        lines.append(f"  reason  {job.error}")
    lines.append(
        f"  durations: queue wait {format_seconds(d.queue_wait)}, run {format_seconds(d.run)}, "
        f"delivery {format_seconds(d.delivery)}, complete → results {format_seconds(d.complete_to_result)}, "
        f"receive → PACS {format_seconds(d.receive_to_pacs)}"
    )
    lines.append("")
    lines.append(
        table(
            ["STEP", "AT (UTC)", "+PREVIOUS", "+FIRST", "DETAIL"],
            [
                [
                    step.name,
                    short_time(step.at),
                    format_seconds(step.seconds_since_previous),
                    format_seconds(step.seconds_since_first),
                    step.detail or "",
                ]
                for step in timeline.steps
            ],
        )
    )
    if timeline.results:
        lines.append("")
        lines.append("results: " + ", ".join(f"{r.kind} {r.sop_instance_uid}" for r in timeline.results))
    return "\n".join(lines)
