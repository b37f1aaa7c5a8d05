"""``dicom-node`` command line. Each command group lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node import __version__
from dicom_node.config import ConfigError, Settings, load_settings

# Modules under dicom_node.cli that add sub-commands; each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = ("serve", "jobs", "studies", "worker", "stats", "detectors")

EXIT_CONFIG_ERROR = 2


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML configuration file (see config/)")


def settings_from(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings for a command; an invalid configuration prints one line and exits with status 2."""
    try:
        return load_settings(getattr(args, "config", None), overrides)
    except ConfigError as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
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
