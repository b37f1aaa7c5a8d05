"""``dicom-node serve``: run the node (Storage SCP, study completion, and the services other parts add)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.cli import add_config_argument, settings_from
from dicom_node.config import Destination, Settings

if TYPE_CHECKING:
    from dicom_node.node import Node

log = logging.getLogger("dicom_node.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="receive studies and run the node until SIGTERM/SIGINT")
    add_config_argument(parser)
    parser.add_argument("--ae-title", help="our AE title (node.ae_title)")
    parser.add_argument("--port", type=int, help="DICOM port (node.port)")
    parser.add_argument("--bind-address", help="address to listen on (node.bind_address)")
    parser.add_argument("--data-dir", type=Path, help="spool, results and SQLite job database (node.data_dir)")
    parser.add_argument(
        "--destination",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="PACS that receives results (repeatable; adds to the configured destinations)",
    )
    parser.add_argument("--study-quiet-seconds", type=float, help="completion.quiet_seconds")
    parser.add_argument("--no-workers", action="store_true", help="do not start embedded workers")
    parser.add_argument("--http-port", type=int, help="admin HTTP port, 0 disables (http.port)")
    parser.set_defaults(func=run)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("node", "ae_title", args.ae_title)
    put("node", "port", args.port)
    put("node", "bind_address", args.bind_address)
    put("node", "data_dir", str(args.data_dir) if args.data_dir else None)
    put("completion", "quiet_seconds", args.study_quiet_seconds)
    put("http", "port", args.http_port)
    if args.no_workers:
        put("workers", "embedded", False)
    return overrides


def compose(settings: Settings) -> Node:
    """The composition root of ``dicom-node serve``: the receiving node, the admin HTTP service, and the job side
    (scheduler on study completion, sweeper, embedded workers unless ``workers.embedded`` is false), all on one
    Celery app. The layers below never import the runtime (dicom_node.workers); they are wired here. Imported when
    called, so that the other commands (``dicom-node jobs list``) load neither Celery nor FastAPI."""
    from dicom_node.admin.actions import JobActions
    from dicom_node.admin.service import admin_service
    from dicom_node.node import build_node
    from dicom_node.workers.service import add_job_services, job_dispatcher
    from dicom_node.workers.versions import model_card_versions

    node = build_node(settings)
    dispatcher = job_dispatcher(settings)
    actions = JobActions(node.db, settings, dispatcher, model_version=model_card_versions(settings))
    http = admin_service(settings, node.db, actions)
    if http is not None:
        node.add_service(http)
    add_job_services(node, dispatcher)
    return node


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    settings = settings_from(args, overrides)
    if args.destination:
        try:
            extra = [Destination.parse(text) for text in args.destination]
        except ValueError as err:
            print(f"dicom-node: invalid configuration: --destination: {err}", file=sys.stderr)
            return 2
        settings.destinations = [*settings.destinations, *extra]

    from dicom_node.logconfig import configure_logging

    configure_logging(settings.logging.level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    node = compose(settings)
    try:
        node.start()
    except OSError as err:
        # One line naming what could not start (the DICOM or the HTTP port: address, port and why), no traceback.
        reason = err.strerror if err.strerror and err.filename is None else str(err)
        print(f"dicom-node: cannot start: {reason}", file=sys.stderr)
        node.stop()
        return 1
    log.info("dicom-node ready: AE %s port %d, data in %s", settings.node.ae_title, node.port, settings.node.data_dir)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
        log.info("stopped")
    return 0
