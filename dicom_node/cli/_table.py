"""Plain-text tables and JSON output shared by the admin commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dicom_node import timeutil


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return timeutil.utc(value).isoformat(timespec="seconds")


def short_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return timeutil.utc(value).strftime("%Y-%m-%d %H:%M:%S")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return short_time(value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in texts)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in texts]
    return "\n".join(lines)


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
