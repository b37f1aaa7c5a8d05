"""``dicom-node`` command line. Each command group lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicom_node import __version__
from dicom_node.config import ConfigError, Settings, load_settings

# Modules under dicom_node.cli that add sub-commands; each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = ("serve", "jobs", "studies", "worker", "stats", "detectors")

EXIT_CONFIG_ERROR = 2

DESCRIPTION = """\
A DICOM worker node: receives studies over C-STORE, runs anomaly detectors on brain MRI and frontal chest X-rays,
and sends the results (DICOM SEG and SR) back to the PACS. Not for primary diagnosis.

Start the node with `dicom-node serve` (and `dicom-node worker` on other hosts). See what it did with the admin
commands `jobs list`, `jobs show ID`, `jobs retry ID`, `studies show STUDY_UID` and `stats`, which all take
--config FILE, --data-dir DIR and --json. `fit`, `calibrate` and `evaluate` train and measure a detector.
`dicom-node COMMAND --help` describes each command."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML configuration file (see config/)")


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the node's data directory (node.data_dir), where the SQLite job database is unless database.url is set",
    )


def add_admin_arguments(parser: argparse.ArgumentParser, json_help: str = "JSON instead of text") -> None:
    """The options of every admin command that reads the job database: --config, --data-dir and --json."""
    add_config_argument(parser)
    add_data_dir_argument(parser)
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(needs_existing_database=True)


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high] (job ids and limits the job database can compare)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value

    return parse


def settings_from(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings for a command (``--config``, then ``--data-dir`` when the command has it, then ``overrides``);
    an invalid configuration prints one line and exits with status 2."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None:
        node = {"data_dir": str(data_dir), **(overrides or {}).get("node", {})}
        overrides = {**(overrides or {}), "node": node}
    try:
        settings = load_settings(getattr(args, "config", None), overrides)
    except ConfigError as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    if getattr(args, "needs_existing_database", False):
        refuse_to_invent_database(args, settings)
    return settings


def refuse_to_invent_database(args: argparse.Namespace, settings: Settings) -> None:
    """An admin command given no configuration (no --config, no --data-dir, no DICOM_NODE_ variable) reads the
    default ./data/jobs.sqlite; when that does not exist it was started in the wrong folder: say so and exit 2,
    rather than create an empty database and answer "no jobs"."""
    configured = (
        getattr(args, "config", None) is not None
        or getattr(args, "data_dir", None) is not None
        or any(name.upper().startswith("DICOM_NODE_") for name in os.environ)
    )
    url = settings.database_url
    if configured or not url.startswith("sqlite:///"):
        return
    path = Path(url.split("///", 1)[1])
    if not path.exists():
        print(
            f"dicom-node: no job database at {path} and no configuration given; pass the node's --config FILE "
            "or --data-dir DIR (an admin command never creates a database)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dicom_node.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)
