"""Times and durations as the node stores, reads and prints them (always UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utcnow() -> datetime:
    """Now, aware, in UTC: every time the node writes is UTC."""
    return datetime.now(UTC)


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


def _shown(text: str) -> str:
    """The given text for an error message, cut short (it may be anything a client sent)."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


MAX_DURATION = timedelta(days=36500)  # a hundred years back is "since the beginning" for a job database


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w`` (at most ``MAX_DURATION``) → timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{_shown(text)} is not a duration such as 90s, 15m, 24h, 7d")
    value = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if not value <= MAX_DURATION.total_seconds():  # also a number too long for a float (inf)
        raise ValueError(f"{_shown(text)} is too long a duration: at most {MAX_DURATION.days}d")
    return timedelta(seconds=value)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A point in time: a duration back from now (``24h``) or an ISO 8601 date/time (UTC when no offset).
    ValueError with a message for anything else, including times that cannot be represented in UTC."""
    if _DURATION.match(text):
        return (now or datetime.now(UTC)) - parse_duration(text)
    try:
        return utc(datetime.fromisoformat(text.strip()))
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the first representable UTC time
        raise ValueError(f"{_shown(text)} is out of the range of UTC times (years 1 to 9999)") from None
    except ValueError:
        raise ValueError(
            f"{_shown(text)} is neither a duration (24h) nor an ISO 8601 time (2026-01-31T08:00:00Z)"
        ) from None


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
