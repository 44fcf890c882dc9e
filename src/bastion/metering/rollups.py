"""Queries over the hourly rollups (`usage_hourly`), for reports and the console.

Every sum here is exact (integers; money in micro-units, per currency) for whole hours: a bound
that is not on the hour is refused (`ValueError`), and `reports.summarize` reads the odd minutes
at either end from the raw records instead. Percentiles come from fixed-bucket histograms, so
they are exact to within one bucket (`HISTOGRAM_BOUNDS_MS`), interpolated linearly inside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Date, Engine, Integer, cast, func, select

from bastion.metering.hourly import LAT, SUMS, TTFT
from bastion.metering.usage import money
from bastion.store.schema import HISTOGRAM_BOUNDS_MS, usage_hourly

#: Report names of the rollup dimensions (as `bastion usage --by` spells them).
COLUMNS: dict[str, str] = {
    "team": "team",
    "cost-center": "cost_center",
    "model": "model",
    "served-model": "served_model",
    "adapter": "adapter",
    "key": "key_id",
    "user": "user",
    "endpoint": "endpoint",
    "currency": "currency",
}
Step = Literal["hour", "day"]


def is_hour(t: datetime | None) -> bool:
    return t is None or (t.minute == 0 and t.second == 0 and t.microsecond == 0)


def month_range(month: str) -> tuple[datetime, datetime]:
    """'2026-11' -> [2026-11-01, 2026-12-01) in UTC; anything else is a clear error."""
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"not a month: {month!r} (use YYYY-MM, e.g. 2026-11)") from None
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else None
    return start, end or start.replace(month=start.month + 1)


def _period(engine: Engine, step: Step) -> tuple[Any, Any]:
    """The period's expression as selected, and as grouped by. PostgreSQL groups days by a
    `date` (a 4-byte hash key) and formats only the result rows: formatting each of a month's
    ~10^5 rollup rows before grouping cost more than the sums."""
    col = usage_hourly.c.hour
    if step == "hour":
        return col, col
    if engine.dialect.name == "postgresql":
        day = cast(func.timezone("UTC", col), Date)
        return func.to_char(day, "YYYY-MM-DD"), day
    day = func.substr(col, 1, 10)
    return day, day


#: Rollup columns that count requests: one row's value (an hour of one key x model x ...) fits
#: a 32-bit integer by far (2^31 an hour is 600,000 requests a second from one key).
COUNTS = frozenset({"requests", "errors", "ttft_count", *LAT, *TTFT})


def count_cell(name: str) -> Any:
    """A rollup column to sum: a count as a 32-bit integer, since PostgreSQL sums `bigint` in
    arbitrary precision (`numeric`) and `integer` in a machine word (measured 40 % faster over
    a month of 10^6 requests); the sum itself is still a 64-bit `bigint`."""
    col = usage_hourly.c[name]
    return cast(col, Integer) if name in COUNTS else col


#: PostgreSQL memory for one report's grouping: the default 4 MB spills a month's grouping by
#: cost center x team x model x day to disk (measured: 2x slower); set for its transaction only.
REPORT_WORK_MEM = "64MB"


def aggregate(
    engine: Engine,
    by: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    where: Mapping[str, str | None] | None = None,
    step: Step | None = None,
    histograms: bool = False,
) -> list[dict[str, Any]]:
    """Sums of the rollups in [since, until) grouped by `by` (names of `COLUMNS`), by currency
    always, and by `step` ('hour': a UTC datetime, 'day': 'YYYY-MM-DD') when given. `where`
    filters on dimensions (None: the records that had none). Rows are raw integers."""
    if not (is_hour(since) and is_hour(until)):
        raise ValueError("rollups hold whole hours: since and until must be on the hour")
    unknown = [b for b in [*by, *(where or {})] if b not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; known: {sorted(COLUMNS)}")
    groups = [usage_hourly.c[COLUMNS[b]].label(b) for b in dict.fromkeys([*by, "currency"])]
    keys = [g.element for g in groups]
    if step is not None:
        shown, grouped = _period(engine, step)
        groups.insert(0, shown.label("period"))
        keys.insert(0, grouped)
    names = [s for s in SUMS if histograms or (s not in LAT and s not in TTFT)]
    sums = [func.sum(count_cell(s)).label(s) for s in names]
    q = select(*groups, *sums).group_by(*keys)
    if since is not None:
        q = q.where(usage_hourly.c.hour >= since)
    if until is not None:
        q = q.where(usage_hourly.c.hour < until)
    for name, value in (where or {}).items():
        q = q.where(usage_hourly.c[COLUMNS[name]] == (value or ""))
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'")
        result = conn.execute(q)
        keys = list(result.keys())
        rows = result.all()
    # Converters chosen once per column, not per cell: a month's day rows number thousands.
    dims = [i for i, k in enumerate(keys) if k in COLUMNS]
    floats = [i for i, k in enumerate(keys) if k in SUMS and k.endswith("_ms_sum")]
    ints = [i for i, k in enumerate(keys) if k in SUMS and not k.endswith("_ms_sum")]
    hour_period = step == "hour"
    out = []
    for r in rows:
        v = list(r)
        for i in dims:
            v[i] = v[i] or None
        for i in ints:
            v[i] = int(v[i] or 0)
        for i in floats:
            v[i] = float(v[i] or 0)
        d: dict[str, Any] = dict(zip(keys, v, strict=True))
        if hour_period:
            p = d["period"]
            if isinstance(p, str):  # SQLite's text, via a label
                d["period"] = datetime.fromisoformat(p).replace(tzinfo=UTC)
            elif p.tzinfo is None:
                d["period"] = p.replace(tzinfo=UTC)
        out.append(d)
    # Missing groups last; a period compares as itself (all rows' are one type), a group as text.
    names = [n for n in ["period", *by, "currency"] if n in keys]
    out.sort(key=lambda d: tuple((d[n] is None, d[n] or "") for n in names))
    return out


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a bucketed distribution in ms, linear inside a bucket;
    None with no observations. Beyond the last bound the last bound is the answer (a floor)."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            if i >= len(HISTOGRAM_BOUNDS_MS):
                return float(HISTOGRAM_BOUNDS_MS[-1])
            lo = HISTOGRAM_BOUNDS_MS[i - 1] if i else 0.0
            hi = HISTOGRAM_BOUNDS_MS[i]
            return float(lo + (hi - lo) * (rank - seen) / n)
        seen += n
    return float(HISTOGRAM_BOUNDS_MS[-1])


def _present(r: dict[str, Any], qs: Sequence[float]) -> dict[str, Any]:
    """A raw aggregate as a report row: money as an exact string, averages, percentiles."""
    out = {k: v for k, v in r.items() if k not in SUMS}
    out.update(
        requests=r["requests"],
        errors=r["errors"],
        prompt_tokens=r["prompt_tokens"],
        cached_tokens=r["cached_tokens"],
        completion_tokens=r["completion_tokens"],
        total_tokens=r["prompt_tokens"] + r["completion_tokens"],
        cost=money(r["cost_micros"]),
        latency_ms_avg=round(r["latency_ms_sum"] / r["requests"], 3) if r["requests"] else None,
        ttft_ms_avg=round(r["ttft_ms_sum"] / r["ttft_count"], 3) if r["ttft_count"] else None,
    )
    if LAT[0] in r:
        lat, ttft = [r[c] for c in LAT], [r[c] for c in TTFT]
        for q in qs:
            out[f"latency_ms_p{round(q * 100)}"] = percentile(lat, q)
            out[f"ttft_ms_p{round(q * 100)}"] = percentile(ttft, q)
    return out


def usage_by(
    engine: Engine,
    by: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
    qs: Sequence[float] = (0.5, 0.95, 0.99),
    **where: str | None,
) -> list[dict[str, Any]]:
    """Usage and spend per group (e.g. `["team"]`, `["cost-center", "model"]`) over whole
    hours, with latency and TTFT percentiles; filters as keywords (`team="alpha"`)."""
    rows = aggregate(engine, by, since, until, _where(where), histograms=True)
    return [_present(r, qs) for r in rows]


def series(
    engine: Engine,
    step: Step,
    since: datetime | None = None,
    until: datetime | None = None,
    by: Sequence[str] = (),
    qs: Sequence[float] = (0.5, 0.95, 0.99),
    **where: str | None,
) -> list[dict[str, Any]]:
    """A time series per hour or per day (UTC), optionally per group (e.g. `["model"]`)."""
    rows = aggregate(engine, by, since, until, _where(where), step=step, histograms=True)
    return [_present(r, qs) for r in rows]


def _where(kw: Mapping[str, str | None]) -> dict[str, str | None]:
    return {k.replace("_", "-"): v for k, v in kw.items()}


def hours(since: datetime, until: datetime) -> list[datetime]:
    """Every hour in [since, until): a chart's x axis, gaps included."""
    out, t = [], since
    while t < until:
        out.append(t)
        t += timedelta(hours=1)
    return out
