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
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A duration back from now (`7d`) or an ISO date/time (UTC unless it names a zone)."""
    if _DURATION.match(text.strip()):
        return (now or datetime.now(UTC)) - parse_duration(text)
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use e.g. 7d, 12h or 2026-11-01)") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
