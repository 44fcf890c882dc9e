"""What the console reads about usage: one thin module, so that its callers do not care where
the numbers come from.

Breakdowns, the burn-down and the time series of a day or more read the hourly rollups
(`bastion.metering`), so a month of 10^6 requests is a few thousand rows; only the last hour's
minute buckets (and a member's own breakdown) read the raw `usage` table. Each takes a
`Scope` that says whose usage a viewer may see (everyone's, one team's, or one user's in a
team), applied here so that no page can forget it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Engine, cast, func, select

from bastion.metering.hourly import BUCKETS, LAT, TTFT
from bastion.metering.reports import summarize
from bastion.metering.rollups import aggregate, count_cell, percentile
from bastion.store.schema import usage, usage_hourly

#: What a breakdown may group by, and the usage column behind each name.
GROUPS = {
    "team": usage.c.team,
    "cost_center": usage.c.cost_center,
    "model": usage.c.model,
    "key": usage.c.key_id,
    "user": usage.c.user,
}
#: Overview windows: how far back, and the width of one chart bucket.
WINDOWS = {
    "1h": (timedelta(hours=1), 60),
    "24h": (timedelta(hours=24), 3600),
    "7d": (timedelta(days=7), 3 * 3600),
    "30d": (timedelta(days=30), 86400),
}


@dataclass(frozen=True)
class Scope:
    """Whose usage a viewer may read: None fields are not narrowed."""

    team: str | None = None
    user: str | None = None

    def where(self) -> Any:
        clause = usage.c.ts.isnot(None)
        if self.team is not None:
            clause &= usage.c.team == self.team
        if self.user is not None:
            clause &= usage.c.user == self.user
        return clause


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every value shown was really measured)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return round(ordered[int(rank) - 1], 1)


#: The metrics of the overview, from one bucket's cell.
METRICS = ("requests", "tokens", "errors", "latency_p50", "latency_p95", "ttft_p50", "ttft_p95")


class _Cell:
    """One model's bucket: counts, and either the measured durations (minute buckets, from the
    records) or histogram counts (hour buckets and wider, from the rollups)."""

    __slots__ = ("errors", "hist", "lat", "requests", "tokens", "ttft")

    def __init__(self, hist: bool) -> None:
        self.requests = self.tokens = self.errors = 0
        self.hist = hist
        self.lat: list[float] = [0.0] * BUCKETS if hist else []
        self.ttft: list[float] = [0.0] * BUCKETS if hist else []

    def metric(self, name: str) -> Any:
        if name in ("requests", "tokens", "errors"):
            return getattr(self, name)
        values = self.lat if name.startswith("latency") else self.ttft
        q = 50 if name.endswith("p50") else 95
        if not self.hist:
            return _percentile(values, q)
        p = percentile(values, q / 100)  # type: ignore[arg-type]
        return None if p is None else round(p, 1)


def _scope_where(scope: Scope) -> dict[str, str | None]:
    where: dict[str, str | None] = {}
    if scope.team is not None:
        where["team"] = scope.team
    if scope.user is not None:
        where["user"] = scope.user
    return where


def raw_cells(
    db: Engine, scope: Scope, start: int, step: int, n: int
) -> dict[str, dict[int, _Cell]]:
    """Buckets of `step` seconds from `start` (Unix seconds), from the usage records: exact
    percentiles, but a scan of every record in the window (used for the last hour's minutes)."""
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + n * step, UTC)
    q = select(
        usage.c.ts, usage.c.model, usage.c.prompt_tokens, usage.c.completion_tokens,
        usage.c.outcome, usage.c.latency_ms, usage.c.ttft_ms,
    ).where(scope.where() & (usage.c.ts >= lo) & (usage.c.ts < hi))  # fmt: skip
    cells: dict[str, dict[int, _Cell]] = defaultdict(dict)
    with db.connect() as conn:
        for r in conn.execute(q):
            i = (int(_utc(r.ts).timestamp()) - start) // step
            if not 0 <= i < n:
                continue
            cell = cells[r.model or "?"].get(i) or cells[r.model or "?"].setdefault(i, _Cell(False))
            cell.requests += 1
            cell.tokens += r.prompt_tokens + r.completion_tokens
            cell.errors += r.outcome != "ok"
            cell.lat.append(r.latency_ms)
            if r.ttft_ms is not None:
                cell.ttft.append(r.ttft_ms)
    return cells


def _bucket_of_hour(db: Engine, start: int, step: int) -> Any:
    """SQL for a rollup row's bucket: (its hour in Unix seconds - start) // step, so that the
    database sums each bucket and hands back one row per bucket and model, not per hour."""
    col = usage_hourly.c.hour
    if db.dialect.name == "postgresql":
        epoch = cast(func.extract("epoch", col), BigInteger)
    else:  # SQLite keeps the hour as text, 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)
        epoch = cast(func.strftime("%s", col), BigInteger)
    return (epoch - start) // step  # >= 0 here (hour >= start): truncation is the floor


def rollup_cells(
    db: Engine, scope: Scope, start: int, step: int, n: int
) -> dict[str, dict[int, _Cell]]:
    """The same buckets (`step` a whole number of hours, `start` on the hour) summed from the
    hourly rollups, by the database: a row per bucket and model, whatever the traffic. The
    rollups are written with the records, so the hour in progress is as current as they are."""
    if step % 3600 or start % 3600:
        raise ValueError("rollup buckets are whole hours")
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + n * step, UTC)
    h = usage_hourly.c
    i = _bucket_of_hour(db, start, step).label("i")
    q = (
        select(
            i,
            h.model,
            func.sum(count_cell("requests")),
            func.sum(h.prompt_tokens + h.completion_tokens),
            func.sum(count_cell("errors")),
            *(func.sum(count_cell(c)) for c in (*LAT, *TTFT)),
        )
        .where((h.hour >= lo) & (h.hour < hi))
        .group_by(i, h.model)
    )
    if scope.team is not None:
        q = q.where(h.team == scope.team)
    if scope.user is not None:
        q = q.where(h.user == scope.user)
    cells: dict[str, dict[int, _Cell]] = defaultdict(dict)
    with db.connect() as conn:
        for row in conn.execute(q):
            idx, model, requests, tokens, errors, *hist = row
            if not 0 <= idx < n:
                continue
            cell = cells[model or "?"].setdefault(int(idx), _Cell(True))
            cell.requests, cell.tokens, cell.errors = int(requests), int(tokens), int(errors)
            cell.lat = [int(v) for v in hist[:BUCKETS]]
            cell.ttft = [int(v) for v in hist[BUCKETS:]]
    return cells


def timeseries(db: Engine, window: str, scope: Scope, now: datetime | None = None) -> dict:
    """Per model and bucket: requests, tokens, errors, latency and TTFT p50/p95, laid out as
    uPlot wants its data (one shared x axis of bucket starts in Unix seconds, then one array
    per model, None where a model had no traffic).

    Windows with hour-wide buckets or wider start and end on the hour, so they are read from
    the hourly rollups alone (no edge minutes to add) and their percentiles are estimates from
    histogram buckets (`approximate`: true); the last hour's minute buckets read its records,
    with exact nearest-rank percentiles."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r} (one of: {', '.join(WINDOWS)})")
    span, step = WINDOWS[window]
    now = now or datetime.now(UTC)
    end = int(now.timestamp()) // step * step + step
    start = end - int(span.total_seconds())
    xs = list(range(start, end, step))
    approximate = step % 3600 == 0
    cells = (rollup_cells if approximate else raw_cells)(db, scope, start, step, len(xs))
    models = sorted(cells)
    series = {
        name: [
            [cells[m][i].metric(name) if i in cells[m] else None for i in range(len(xs))]
            for m in models
        ]
        for name in METRICS
    }
    totals = {m: sum(c.requests for c in cells[m].values()) for m in models}
    return {"window": window, "step": step, "x": xs, "models": models, "series": series,
            "requests": totals, "approximate": approximate}  # fmt: skip


def breakdown(db: Engine, by: str, since: datetime, scope: Scope) -> list[dict[str, Any]]:
    """Requests, tokens and spend since `since`, grouped by one of GROUPS (a row per group and
    currency), biggest spend first. Money stays exact: integer micro-units summed, then a
    Decimal. Everyone's or a team's usage comes from the hourly rollups for whole hours and
    from the records for the minutes at the edges (`reports.summarize`): a month of a million
    requests is a few thousand rollup rows."""
    if by not in GROUPS:
        raise ValueError(f"unknown grouping {by!r} (one of: {', '.join(GROUPS)})")
    if scope.user is None:
        name = by.replace("_", "-")
        rows = [
            {
                "name": None if r[name] == "(none)" else r[name],
                "requests": r["requests"],
                "prompt_tokens": r["prompt_tokens"],
                "completion_tokens": r["completion_tokens"],
                "cost": Decimal(r["cost"]),
                "currency": r["currency"],
            }
            for r in summarize(db, name, since, None, scope.team)  # type: ignore[arg-type]
        ]
        rows.sort(key=lambda r: (-r["cost"], -r["requests"]))
        return rows
    col = GROUPS[by]
    q = (
        select(
            col.label("name"),
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion"),
            func.coalesce(func.sum(usage.c.cost_micros), 0).label("cost"),
            func.max(usage.c.currency).label("currency"),
        )
        .where(scope.where() & (usage.c.ts >= since))
        .group_by(col)
        .order_by(func.sum(usage.c.cost_micros).desc(), func.count().desc())
    )
    with db.connect() as conn:
        return [
            {
                "name": r.name,
                "requests": r.requests,
                "prompt_tokens": int(r.prompt),
                "completion_tokens": int(r.completion),
                "cost": Decimal(int(r.cost)) / 1_000_000,
                "currency": r.currency,
            }
            for r in conn.execute(q)
        ]


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def burn_down(db: Engine, scope: Scope, now: datetime | None = None) -> dict[str, Any]:
    """Spend per UTC day of this month, cumulative, and a straight-line forecast to month end
    from the average daily spend so far."""
    now = now or datetime.now(UTC)
    start = month_start(now)
    nxt = (start + timedelta(days=32)).replace(day=1)
    days = (nxt - start).days
    daily = [0] * days
    # Whole days of the month from the rollups (per day, every currency added as before).
    for r in aggregate(db, [], start, nxt, _scope_where(scope), step="day"):
        day = (datetime.fromisoformat(r["period"]).replace(tzinfo=UTC) - start).days
        if 0 <= day < days:
            daily[day] += r["cost_micros"]
    cumulative, total = [], 0
    for day in range(days):
        total += daily[day]
        cumulative.append(total if day <= now.day - 1 else None)
    so_far = Decimal(total) / 1_000_000
    forecast = so_far / now.day * days
    x = [int((start + timedelta(days=d)).timestamp()) for d in range(days)]
    spent = [None if c is None else float(Decimal(c) / 1_000_000) for c in cumulative]
    return {
        "x": x,
        "spent": spent,
        "so_far": so_far,
        "forecast": forecast.quantize(Decimal("0.000001")),  # micro-units, as usage is priced
    }
