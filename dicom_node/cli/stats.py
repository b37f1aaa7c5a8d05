"""``dicom-node stats --since 24h``: counts, abnormal rate and p50/p95 latency per detector (``GET /api/stats``)."""

from __future__ import annotations

import argparse
from typing import Any

from dicom_node.admin import queries
from dicom_node.admin.schemas import Stats
from dicom_node.cli import add_admin_arguments, settings_from
from dicom_node.cli._table import short_time, table
from dicom_node.db import Database
from dicom_node.timeutil import format_seconds, parse_time


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("stats", help="jobs, abnormal rate and latency per detector over a period")
    add_admin_arguments(parser, "JSON (the same document as the REST API)")
    parser.add_argument("--since", default="24h", type=_since, help="24h, 7d, or an ISO 8601 time (default 24h)")
    parser.set_defaults(func=show_stats)


def _since(text: str) -> Any:
    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def show_stats(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            result = queries.stats(session, args.since)
    finally:
        db.dispose()
    print(result.model_dump_json(indent=2) if args.json else render(result))
    return 0


def render(stats: Stats) -> str:
    head = (
        f"{short_time(stats.since)} → {short_time(stats.until)} UTC: {stats.studies_received} studies, "
        f"{stats.instances_received} instances received, {stats.jobs} jobs"
    )
    if not stats.detectors:
        return head + "\nno jobs in this period"
    rows = [
        [
            d.detector,
            d.jobs,
            d.by_state.get("delivered", 0),
            d.failed,
            d.by_state.get("queued", 0) + d.by_state.get("running", 0),
            f"{d.abnormal}/{d.with_result}",
            "-" if d.abnormal_rate is None else f"{100 * d.abnormal_rate:.1f} %",
            format_seconds(d.latency_p50),
            format_seconds(d.latency_p95),
            format_seconds(d.run_p50),
        ]
        for d in stats.detectors
    ]
    headers = ["DETECTOR", "JOBS", "DELIVERED", "FAILED", "PENDING", "ABNORMAL", "RATE", "P50", "P95", "RUN P50"]
    note = "latency: study complete → results delivered (or finished when nothing is delivered)"
    return "\n".join([head, "", table(headers, rows), "", note])
