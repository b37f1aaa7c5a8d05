"""``dicom-node studies show``: one study as the node saw it: series, routing, completion, jobs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy import func, select

from dicom_node.cli import add_admin_arguments, settings_from
from dicom_node.cli._table import dump_json, iso, table
from dicom_node.db import Database, Instance, Job, Series, Study

EXIT_NOT_FOUND = 1


def register(subparsers: Any) -> None:
    studies = subparsers.add_parser("studies", help="inspect received studies")
    commands = studies.add_subparsers(dest="studies_command", required=True)
    show = commands.add_parser("show", help="a study's series, routing decisions, completion and jobs")
    add_admin_arguments(show)
    show.add_argument("study_uid", metavar="STUDY_UID")
    show.set_defaults(func=show_study)


def study_report(db: Database, study_uid: str) -> dict[str, Any] | None:
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one_or_none()
        if study is None:
            return None
        late = session.execute(
            select(func.count(Instance.id)).join(Series).where(Series.study_id == study.id, Instance.after_completion)
        ).scalar_one()
        duplicates = session.execute(
            select(func.coalesce(func.sum(Instance.times_received - 1), 0))
            .join(Series)
            .where(Series.study_id == study.id)
        ).scalar_one()
        return {
            "study_instance_uid": study.study_instance_uid,
            "state": study.state.value,
            "modalities": study.modalities,
            "calling_ae_title": study.calling_ae_title,
            "instances": study.instance_count,
            "late_instances": int(late),
            "duplicates_received": int(duplicates),
            "first_received_at": iso(study.first_received_at),
            "last_received_at": iso(study.last_received_at),
            "completed_at": iso(study.completed_at),
            "completion_reason": study.completion_reason,
            "completion_count": study.completion_count,
            "needs_reprocessing": study.needs_reprocessing,
            "interrupted_at": iso(study.interrupted_at),
            "interruption_reason": study.interruption_reason,
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "series_number": s.series_number,
                    "modality": s.modality,
                    "series_description": s.series_description,
                    "instances": s.instance_count,
                    "detector": s.detector,
                    "routing_rule": s.routing_rule,
                    "routing_reason": s.routing_reason,
                    "routed_at": iso(s.routed_at),
                }
                for s in study.series
            ],
            "jobs": [
                {
                    "id": j.id,
                    "series_instance_uid": j.series.series_instance_uid,
                    "detector": j.detector,
                    "state": j.state.value,
                    "series_score": j.series_score,
                    "is_abnormal": j.is_abnormal,
                    "created_at": iso(j.created_at),
                }
                for j in session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars()
            ],
        }


def show_study(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    db = Database(settings.database_url)
    try:
        report = study_report(db, args.study_uid)
    finally:
        db.dispose()
    if report is None:
        print(f"dicom-node: no study with Study Instance UID {args.study_uid}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        print(dump_json(report))
        return 0
    print(f"Study {report['study_instance_uid']}")
    for label, key in [
        ("state", "state"),
        ("modalities", "modalities"),
        ("calling AE", "calling_ae_title"),
        ("instances", "instances"),
        ("late instances", "late_instances"),
        ("duplicates received", "duplicates_received"),
        ("first received", "first_received_at"),
        ("last received", "last_received_at"),
        ("completed", "completed_at"),
        ("completion reason", "completion_reason"),
        ("times completed", "completion_count"),
        ("needs reprocessing", "needs_reprocessing"),
        ("interrupted", "interrupted_at"),
        ("interruption", "interruption_reason"),
    ]:
        value = report[key]
        print(f"  {label + ':':<21}{'-' if value is None else value}")
    print()
    print("Series")
    print(
        table(
            ["NUMBER", "MODALITY", "DESCRIPTION", "INSTANCES", "ROUTED TO", "RULE", "REASON", "SERIES UID"],
            [
                [
                    s["series_number"],
                    s["modality"],
                    s["series_description"],
                    s["instances"],
                    s["detector"] or "ignored",
                    s["routing_rule"],
                    s["routing_reason"],
                    s["series_instance_uid"],
                ]
                for s in report["series"]
            ],
        )
    )
    print()
    if report["jobs"]:
        print("Jobs")
        print(
            table(
                ["ID", "DETECTOR", "STATE", "SCORE", "ABNORMAL", "CREATED", "SERIES UID"],
                [
                    [
                        j["id"],
                        j["detector"],
                        j["state"],
                        j["series_score"],
                        j["is_abnormal"],
                        (j["created_at"] or "-").replace("T", " ")[:19],
                        j["series_instance_uid"],
                    ]
                    for j in report["jobs"]
                ],
            )
        )
    else:
        print("Jobs: none")
    return 0
