"""The console's usage queries (console/queries.py) on SQLite and PostgreSQL: buckets, scopes,
percentiles and exact money, against records written by the real usage writer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from bastion.console import queries
from bastion.console.queries import Scope
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly

NOW = datetime(2026, 11, 20, 12, 30, 15, tzinfo=UTC)
PRICE = PriceSettings(currency="USD", prompt=1.0, cached_prompt=0.5, completion=2.0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/u.db" if request.param == "sqlite" else None
    engine = make_engine(url or request.getfixturevalue("pg_url"))
    upgrade(engine)
    with engine.begin() as conn:  # PostgreSQL's test database is shared with other modules
        conn.execute(usage.delete())
        conn.execute(usage_hourly.delete())
    writer = UsageWriter(engine, flush_seconds=0.05)
    writer.open()
    rows = [  # minutes ago, team, user, model, latency, outcome
        (1, "alpha", "alice", "tiny", 100.0, "ok"),
        (1, "alpha", "alice", "tiny", 300.0, "ok"),
        (1, "alpha", "dave", "tiny", 200.0, "upstream_error"),
        (5, "beta", "bob", "minilm", 40.0, "ok"),
        (90, "alpha", "alice", "tiny", 999.0, "ok"),  # outside the 1h window
        (60 * 24 * 25, "alpha", "alice", "tiny", 50.0, "ok"),  # last month
    ]
    for i, (ago, team, user, model, latency, outcome) in enumerate(rows):
        r = UsageRecord(
            request_id=f"q{i}", endpoint="chat", team=team, cost_center="cc", user=user,
            model=model, prompt_tokens=10, completion_tokens=5, outcome=outcome,
            latency_ms=latency, ttft_ms=latency / 2, ts=NOW - timedelta(minutes=ago),
        )  # fmt: skip
        r.price(PRICE)
        writer.add(r)
    writer.close()
    yield engine
    engine.dispose()


def test_timeseries_buckets_scopes_and_percentiles(engine) -> None:  # type: ignore[no-untyped-def]
    every = queries.timeseries(engine, "1h", Scope(), NOW)
    assert len(every["x"]) == 60 and every["step"] == 60
    assert every["x"][-1] <= NOW.timestamp() < every["x"][-1] + 60
    assert every["models"] == ["minilm", "tiny"]
    assert every["requests"] == {"minilm": 1, "tiny": 3}
    tiny = every["models"].index("tiny")
    points = [(i, v) for i, v in enumerate(every["series"]["requests"][tiny]) if v is not None]
    assert points == [(58, 3)]  # one bucket, a minute before the current one
    assert every["series"]["errors"][tiny][58] == 1
    assert every["series"]["latency_p50"][tiny][58] == 200.0  # nearest rank: a measured value
    assert every["series"]["latency_p95"][tiny][58] == 300.0
    assert every["series"]["ttft_p50"][tiny][58] == 100.0
    assert every["series"]["tokens"][tiny][58] == 45
    team = queries.timeseries(engine, "1h", Scope(team="beta"), NOW)
    assert team["requests"] == {"minilm": 1}
    mine = queries.timeseries(engine, "24h", Scope(team="alpha", user="alice"), NOW)
    assert mine["requests"] == {"tiny": 3} and len(mine["x"]) == 24
    with pytest.raises(ValueError, match="unknown window"):
        queries.timeseries(engine, "2h", Scope(), NOW)


def test_breakdown_and_burn_down_keep_money_exact(engine) -> None:  # type: ignore[no-untyped-def]
    since = queries.month_start(NOW)
    by_team = {r["name"]: r for r in queries.breakdown(engine, "team", since, Scope())}
    assert by_team["alpha"]["requests"] == 4  # last month's record is not this month's
    # 10 prompt at $1/M + 5 completion at $2/M = $0.00002 a request, exactly.
    assert by_team["alpha"]["cost"] == Decimal("0.00008") and by_team["alpha"]["currency"] == "USD"
    by_user = queries.breakdown(engine, "user", since, Scope(team="alpha"))
    assert [(r["name"], r["requests"]) for r in by_user] == [("alice", 3), ("dave", 1)]
    with pytest.raises(ValueError, match="unknown grouping"):
        queries.breakdown(engine, "colour", since, Scope())
    burn = queries.burn_down(engine, Scope(team="alpha"), NOW)
    assert len(burn["x"]) == 30 and burn["so_far"] == Decimal("0.00008")
    assert burn["spent"][19] == pytest.approx(0.00008) and burn["spent"][20] is None
    assert burn["forecast"] == Decimal("0.00008") / 20 * 30
