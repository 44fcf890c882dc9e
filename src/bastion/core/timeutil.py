"""Durations and points in time as operators type them: `30d`, `12h`, `2026-11-01`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m, 2w)")
    try:
        delta = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        datetime.now(UTC) + delta  # a lifetime must end on a date a timestamp can hold
    except OverflowError:
        raise ValueError(f"duration too long: {text!r}") from None
    return delta


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A duration back from now (`7d`) or an ISO date/time (UTC unless it names a zone).

    Times beyond what a UTC timestamp can hold (year 1 at +05:00) are the earliest or latest
    one: a bound before anything was recorded selects the same as the earliest."""
    if _DURATION.match(text.strip()):
        now = now or datetime.now(UTC)
        try:
            return now - parse_duration(text)
        except (ValueError, OverflowError):
            return datetime.min.replace(tzinfo=UTC)
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use e.g. 7d, 12h or 2026-11-01)") from None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        edge = datetime.min if dt.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)
