"""What the console reads about usage: one thin module, so that its callers do not care where
the numbers come from.

Breakdowns read the hourly rollups (`bastion.metering`); the time series and the burn-down
still read the raw `usage` table (their minute buckets and exact percentiles need it), and
these functions are the only place to change for that. Each takes a
`Scope` that says whose usage a viewer may see (everyone's, one team's, or one user's in a
team), applied here so that no page can forget it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, select

from bastion.metering.reports import summarize
from bastion.store.schema import usage

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


def timeseries(db: Engine, window: str, scope: Scope, now: datetime | None = None) -> dict:
    """Per model and bucket: requests, tokens, errors, latency and TTFT p50/p95, laid out as
    uPlot wants its data (one shared x axis of bucket starts in Unix seconds, then one array
    per model, None where a model had no traffic)."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r} (one of: {', '.join(WINDOWS)})")
    span, step = WINDOWS[window]
    now = now or datetime.now(UTC)
    end = int(now.timestamp()) // step * step + step
    start = end - int(span.total_seconds())
    xs = list(range(start, end, step))
    q = select(
        usage.c.ts, usage.c.model, usage.c.prompt_tokens, usage.c.completion_tokens,
        usage.c.outcome, usage.c.latency_ms, usage.c.ttft_ms,
    ).where(scope.where() & (usage.c.ts >= datetime.fromtimestamp(start, UTC)))  # fmt: skip
    cells: dict[str, dict[int, list[Any]]] = defaultdict(dict)
    with db.connect() as conn:
        for r in conn.execute(q):
            i = (int(_utc(r.ts).timestamp()) - start) // step
            if not 0 <= i < len(xs):
                continue
            cell = cells[r.model or "?"].setdefault(i, [0, 0, 0, [], []])
            cell[0] += 1
            cell[1] += r.prompt_tokens + r.completion_tokens
            cell[2] += r.outcome != "ok"
            cell[3].append(r.latency_ms)
            if r.ttft_ms is not None:
                cell[4].append(r.ttft_ms)
    models = sorted(cells)
    metrics: dict[str, Any] = {
        "requests": lambda c: c[0],
        "tokens": lambda c: c[1],
        "errors": lambda c: c[2],
        "latency_p50": lambda c: _percentile(c[3], 50),
        "latency_p95": lambda c: _percentile(c[3], 95),
        "ttft_p50": lambda c: _percentile(c[4], 50),
        "ttft_p95": lambda c: _percentile(c[4], 95),
    }
    series = {
        name: [[fn(cells[m][i]) if i in cells[m] else None for i in range(len(xs))] for m in models]
        for name, fn in metrics.items()
    }
    totals = {m: sum(c[0] for c in cells[m].values()) for m in models}
    return {"window": window, "step": step, "x": xs, "models": models, "series": series,
            "requests": totals}  # fmt: skip


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
    q = select(usage.c.ts, usage.c.cost_micros).where(scope.where() & (usage.c.ts >= start))
    with db.connect() as conn:
        for r in conn.execute(q):
            day = (_utc(r.ts) - start).days
            if 0 <= day < days:
                daily[day] += r.cost_micros
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
