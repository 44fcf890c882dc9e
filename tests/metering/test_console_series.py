"""The console's overview series and burn-down from the hourly rollups equal the same numbers
computed from the raw usage records, on SQLite and PostgreSQL (issue 15, item 2)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from bastion.console import queries
from bastion.console.queries import Scope
from bastion.metering.hourly import BUCKETS, bucket
from bastion.metering.rollups import percentile
from bastion.metering.usage import UsageRecord, write_batch
from bastion.store.schema import HISTOGRAM_BOUNDS_MS, usage
from tests.metering.test_rollups import make_records

# Inside the records' three days (from 2026-11-03 07:00), mid-hour on purpose.
NOW = datetime(2026, 11, 5, 14, 37, 12, tzinfo=UTC)


@pytest.fixture
def filled(engine: sa.Engine) -> sa.Engine:
    recs = make_records(2000)
    write_batch(engine, [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs])
    return engine


def _raw(engine: sa.Engine, start: int, step: int, n: int, scope: Scope) -> dict:
    """The reference: every record in the window, bucketed by hand in Python."""
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + n * step, UTC)
    cells: dict = defaultdict(lambda: {"n": 0, "tok": 0, "err": 0, "lat": [], "ttft": []})
    with engine.connect() as conn:
        for r in conn.execute(sa.select(usage)).mappings():
            ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=UTC)
            if not lo <= ts < hi:
                continue
            if scope.team is not None and r["team"] != scope.team:
                continue
            if scope.user is not None and r["user"] != scope.user:
                continue
            c = cells[(r["model"] or "?", (int(ts.timestamp()) - start) // step)]
            c["n"] += 1
            c["tok"] += r["prompt_tokens"] + r["completion_tokens"]
            c["err"] += r["outcome"] != "ok"
            c["lat"].append(r["latency_ms"])
            if r["ttft_ms"] is not None:
                c["ttft"].append(r["ttft_ms"])
    return cells


def _hist(values: list[float]) -> list[int]:
    h = [0] * BUCKETS
    for v in values:
        h[bucket(v)] += 1
    return h


def _within_a_bucket(estimate: float, values: list[float], q: float) -> bool:
    """The estimate lies in the bucket that holds the exact nearest-rank value."""
    exact = sorted(values)[max(1, math.ceil(len(values) * q)) - 1]
    b = bucket(exact)
    lo = HISTOGRAM_BOUNDS_MS[b - 1] if b else 0.0
    hi = HISTOGRAM_BOUNDS_MS[b] if b < len(HISTOGRAM_BOUNDS_MS) else HISTOGRAM_BOUNDS_MS[-1]
    return lo - 0.05 <= estimate <= hi + 0.05


@pytest.mark.parametrize("window", ["24h", "7d", "30d"])
@pytest.mark.parametrize(
    "scope", [Scope(), Scope(team="alpha"), Scope(team="beta", user="ann")], ids=str
)
def test_rollup_series_equal_the_records(filled: sa.Engine, window: str, scope: Scope) -> None:
    got = queries.timeseries(filled, window, scope, NOW)
    assert got["approximate"] is True
    start, step, n = got["x"][0], got["step"], len(got["x"])
    raw = _raw(filled, start, step, n, scope)
    assert got["models"] == sorted({m for m, _ in raw})
    assert sum(got["requests"].values()) == sum(c["n"] for c in raw.values()) > 0
    points = 0
    for mi, model in enumerate(got["models"]):
        for i in range(n):
            c = raw.get((model, i))
            s = {k: got["series"][k][mi][i] for k in got["series"]}
            if c is None:
                assert set(s.values()) == {None}
                continue
            points += 1
            assert (s["requests"], s["tokens"], s["errors"]) == (c["n"], c["tok"], c["err"])
            # Percentiles: exactly what the histogram of the same records gives, and within
            # the bucket of the exact nearest-rank value.
            for key, values, q in [
                ("latency_p50", c["lat"], 0.5), ("latency_p95", c["lat"], 0.95),
                ("ttft_p50", c["ttft"], 0.5), ("ttft_p95", c["ttft"], 0.95),
            ]:  # fmt: skip
                want = percentile(_hist(values), q)
                assert s[key] == (None if want is None else round(want, 1))
                if values:
                    assert _within_a_bucket(s[key], values, q)
    assert points > 0


def test_the_last_hour_reads_the_records_exactly(filled: sa.Engine) -> None:
    got = queries.timeseries(filled, "1h", Scope(), NOW)
    assert got["approximate"] is False and got["step"] == 60
    raw = _raw(filled, got["x"][0], 60, 60, Scope())
    assert sum(got["requests"].values()) == sum(c["n"] for c in raw.values()) > 0


@pytest.mark.parametrize("scope", [Scope(), Scope(team="gamma")], ids=str)
def test_burn_down_from_rollups_equals_the_records(filled: sa.Engine, scope: Scope) -> None:
    burn = queries.burn_down(filled, scope, NOW)
    daily: dict[int, int] = defaultdict(int)
    with filled.connect() as conn:
        for r in conn.execute(sa.select(usage.c.ts, usage.c.team, usage.c.cost_micros)).mappings():
            if scope.team is None or r["team"] == scope.team:
                ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=UTC)
                daily[ts.day - 1] += r["cost_micros"]
    total = 0
    for day in range(30):
        total += daily[day]
        want = float(Decimal(total) / 1_000_000) if day < NOW.day else None
        assert burn["spent"][day] == want
    assert burn["so_far"] == Decimal(total) / 1_000_000 > 0
    assert burn["x"][0] == int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
    assert burn["x"][1] - burn["x"][0] == int(timedelta(days=1).total_seconds())
