"""Hourly usage rollups (`usage_hourly`): written with every usage batch, rebuilt on demand.

The usage writer calls `add_batch` inside the transaction that inserts the records, so a
rollup row and the records it sums commit or roll back together: the two never drift, however
a batch fails or is retried. Each row is an exact upsert (`INSERT … ON CONFLICT DO UPDATE SET
n = n + excluded.n`, on PostgreSQL and SQLite alike), so several gateway replicas can add to the
same hour concurrently; rows are upserted in a fixed order so two writers never deadlock.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from bastion.store.schema import HISTOGRAM_BOUNDS_MS, ROLLUP_DIMENSIONS, usage, usage_hourly

log = logging.getLogger("bastion.metering")

BUCKETS = len(HISTOGRAM_BOUNDS_MS) + 1
LAT = tuple(f"lat_{i}" for i in range(BUCKETS))
TTFT = tuple(f"ttft_{i}" for i in range(BUCKETS))
SUMS = (
    "requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros",
    "latency_ms_sum", "ttft_ms_sum", "ttft_count", *LAT, *TTFT,
)  # fmt: skip
KEY = ("hour", *ROLLUP_DIMENSIONS)


def bucket(ms: float) -> int:
    """The histogram bucket of a duration: the first whose bound is >= it (the last: above)."""
    return bisect_left(HISTOGRAM_BOUNDS_MS, ms)


def hour_of(ts: datetime) -> datetime:
    if ts.tzinfo is None:  # SQLite hands back naive times, which are UTC
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def accumulate(acc: dict[tuple[Any, ...], dict[str, Any]], row: Mapping[str, Any]) -> None:
    """Adds one usage row (the writer's dict of `UsageRecord` fields) to `acc`."""
    key = (hour_of(row["ts"]), *(row.get(d) or "" for d in ROLLUP_DIMENSIONS))
    a = acc.get(key)
    if a is None:
        a = acc[key] = dict.fromkeys(SUMS, 0)
        a["latency_ms_sum"] = a["ttft_ms_sum"] = 0.0
    a["requests"] += 1
    a["errors"] += row.get("outcome", "ok") != "ok"
    a["prompt_tokens"] += row.get("prompt_tokens") or 0
    a["cached_tokens"] += row.get("cached_tokens") or 0
    a["completion_tokens"] += row.get("completion_tokens") or 0
    a["cost_micros"] += row.get("cost_micros") or 0
    latency = float(row.get("latency_ms") or 0.0)
    a["latency_ms_sum"] += latency
    a[LAT[bucket(latency)]] += 1
    ttft = row.get("ttft_ms")
    if ttft is not None:
        a["ttft_ms_sum"] += float(ttft)
        a["ttft_count"] += 1
        a[TTFT[bucket(float(ttft))]] += 1


def _statement(dialect: Any) -> tuple[str, tuple[str, ...] | None]:
    """The upsert as the driver's SQL text and its parameter order (None: named parameters),
    compiled once per dialect: a batch then goes to the driver's executemany as plain tuples,
    without SQLAlchemy's per-row parameter processing (most of the rollup's cost otherwise)."""
    cached = _COMPILED.get(dialect.name)
    if cached is None:
        ins = (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(usage_hourly)
        stmt = ins.on_conflict_do_update(
            index_elements=list(KEY),
            set_={s: usage_hourly.c[s] + ins.excluded[s] for s in SUMS},
        )
        compiled = stmt.compile(dialect=dialect)
        order = tuple(compiled.positiontup) if compiled.positional else None  # type: ignore[arg-type]
        cached = _COMPILED[dialect.name] = (str(compiled), order)
    return cached


_COMPILED: dict[str, tuple[str, tuple[str, ...] | None]] = {}


def upsert(conn: Connection, acc: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """Adds the accumulated sums to their rollup rows (creating those that are missing)."""
    if not acc:
        return
    sql, order = _statement(conn.dialect)
    text_hours = conn.dialect.name == "sqlite"
    rows = []
    # One fixed order (the key's), so concurrent writers lock rows in the same order.
    for k in sorted(acc, key=_sort_key):
        # SQLite keeps a time as SQLAlchemy's text form of it (what `DateTime` writes).
        hour = k[0].strftime("%Y-%m-%d %H:%M:%S.%f") if text_hours else k[0]
        row = {"hour": hour, **dict(zip(ROLLUP_DIMENSIONS, k[1:], strict=True)), **acc[k]}
        rows.append(tuple(row[n] for n in order) if order is not None else row)
    conn.exec_driver_sql(sql, rows)  # type: ignore[arg-type]


def _sort_key(k: tuple[Any, ...]) -> tuple[Any, ...]:
    return (k[0].timestamp(), *k[1:])


def add_batch(conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    acc: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        accumulate(acc, r)
    upsert(conn, acc)


# -- rebuilding from the usage records ------------------------------------------------------------
def _hour_expr(dialect: str) -> Any:
    if dialect == "postgresql":
        return func.timezone("UTC", func.date_trunc("hour", func.timezone("UTC", usage.c.ts)))
    return func.strftime("%Y-%m-%d %H:00:00.000000", usage.c.ts)


def _hist(col: Any, i: int) -> Any:
    conds = [col.is_not(None)]
    if i > 0:
        conds.append(col > HISTOGRAM_BOUNDS_MS[i - 1])
    if i < len(HISTOGRAM_BOUNDS_MS):
        conds.append(col <= HISTOGRAM_BOUNDS_MS[i])
    return func.coalesce(func.sum(case((and_(*conds), 1), else_=0)), 0)


def rebuild_on(
    conn: Connection, since: datetime | None = None, until: datetime | None = None
) -> int:
    """Replaces the rollups of whole hours in [since, until) (default: all) by sums of the usage
    records, in the caller's transaction; returns how many rollup rows it wrote.

    The usage table is locked against the writer for the duration (PostgreSQL: SHARE mode;
    SQLite: the delete below takes the database's write lock first), so no batch lands between
    the read and the write: a batch that waits simply commits after, adding to fresh rows."""
    since = hour_of(since) if since else None
    until = hour_of(until) + timedelta(hours=1) if until and until != hour_of(until) else until
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.exec_driver_sql("LOCK TABLE usage IN SHARE MODE")
    d = usage_hourly.delete()
    if since:
        d = d.where(usage_hourly.c.hour >= since)
    if until:
        d = d.where(usage_hourly.c.hour < until)
    conn.execute(d)
    hour = _hour_expr(dialect)
    dims = [func.coalesce(usage.c[n], literal("")) for n in ROLLUP_DIMENSIONS]
    q = select(
        hour,
        *dims,
        func.count(),
        func.coalesce(func.sum(case((usage.c.outcome != "ok", 1), else_=0)), 0),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.cached_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
        func.coalesce(func.sum(usage.c.cost_micros), 0),
        func.coalesce(func.sum(usage.c.latency_ms), 0.0),
        func.coalesce(func.sum(usage.c.ttft_ms), 0.0),
        func.count(usage.c.ttft_ms),
        *(_hist(usage.c.latency_ms, i) for i in range(BUCKETS)),
        *(_hist(usage.c.ttft_ms, i) for i in range(BUCKETS)),
    ).group_by(hour, *dims)
    if since:
        q = q.where(usage.c.ts >= since)
    if until:
        q = q.where(usage.c.ts < until)
    conn.execute(usage_hourly.insert().from_select([*KEY, *SUMS], q))
    # Counted, not the driver's rowcount: psycopg reports -1 for INSERT … SELECT.
    n = select(func.count()).select_from(usage_hourly)
    if since:
        n = n.where(usage_hourly.c.hour >= since)
    if until:
        n = n.where(usage_hourly.c.hour < until)
    return int(conn.execute(n).scalar_one())


def rebuild(engine: Engine, since: datetime | None = None, until: datetime | None = None) -> int:
    """`bastion report rebuild-rollups`: one transaction (see `rebuild_on`)."""
    with engine.begin() as conn:
        n = rebuild_on(conn, since, until)
    log.info("rebuilt %d hourly rollup rows", n)
    return n
