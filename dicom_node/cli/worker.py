"""``dicom-node worker``: run detection (and delivery) jobs from the broker."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dicom_node.cli import EXIT_CONFIG_ERROR, add_config_argument, add_data_dir_argument, settings_from


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a Celery worker for detection and delivery jobs",
        description="Consume jobs from the broker (Redis with --broker redis://host:6379/0; the embedded broker "
        "under the data directory otherwise). CUDA when available (one process per GPU), CPU otherwise.",
    )
    add_config_argument(parser)
    add_data_dir_argument(parser)
    parser.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues (default: every enabled detector, and delivery when installed), "
        "e.g. brain_mri,chest_xray",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--concurrency", type=int, default=None, help="pool processes (default: one per GPU, or "
                        "workers.concurrency on CPU)")  # fmt: skip
    parser.add_argument("--broker", default=None, help="broker URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--hostname", default=None, help="Celery node name, unique per worker (name@host)")
    parser.add_argument("--loglevel", default=None, help="DEBUG, INFO, WARNING or ERROR (default: logging.level)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.broker:
        overrides["broker"] = {"url": args.broker}
    if args.device:
        overrides.setdefault("workers", {})["device"] = args.device
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise SystemExit("dicom-node: --concurrency must be at least 1")
        overrides.setdefault("workers", {})["concurrency"] = args.concurrency
    settings = settings_from(args, overrides)
    from dicom_node.logconfig import prepare_worker_logging
    from dicom_node.workers.worker import (
        run_worker,  # lazy: `dicom-node jobs list` must not import Celery workers or torch
    )

    queues = [name.strip() for name in args.queues.split(",") if name.strip()] if args.queues else None
    problem = check_queues(queues)
    if problem:
        print(f"dicom-node: --queues: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    prepare_worker_logging()
    return run_worker(
        settings,
        queues=queues,
        device=args.device,
        concurrency=args.concurrency,
        hostname=args.hostname,
        loglevel=args.loglevel,
    )


def check_queues(queues: list[str] | None) -> str | None:
    """Why these queues cannot be consumed here, or None. A message whose task this worker does not have would be
    discarded by Celery, so refuse rather than lose it."""
    if queues is None:
        return None
    from dicom_node.workers.app import DELIVERY_QUEUE, delivery_tasks_available, detection_queues

    if not queues:
        return "no queue given"
    known = (*detection_queues(), DELIVERY_QUEUE)
    unknown = [name for name in queues if name not in known]
    if unknown:
        return f"unknown queue {unknown[0]!r} (known: {', '.join(known)})"
    if DELIVERY_QUEUE in queues and not delivery_tasks_available():
        return "the delivery queue needs the delivery tasks (workers/delivery_tasks.py), which are not installed"
    return None
