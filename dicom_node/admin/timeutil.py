"""Times and durations as the admin surface reads and prints them (always UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime; SQLite hands back naive datetimes that were stored as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    """``later - earlier`` in seconds, None when either end is unknown."""
    if later is None or earlier is None:
        return None
    return (utc(later) - utc(earlier)).total_seconds()


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w`` → timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 24h, 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A point in time: a duration back from now (``24h``) or an ISO 8601 date/time (UTC when no offset)."""
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        pass
    try:
        return utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (24h) nor an ISO 8601 time (2026-01-31T08:00:00Z)") from None


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear-interpolated percentile (like numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def format_seconds(value: float | None) -> str:
    """Human-readable duration for the CLI: ``0.42 s``, ``3 min 5 s``, ``2 h 4 min``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f} s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
