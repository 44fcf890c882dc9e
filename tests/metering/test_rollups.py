"""Hourly rollups equal the usage records they sum, on SQLite and PostgreSQL: written by the
usage writer (a retried, partly written batch included), rebuilt from the records, and filled
by migration 0014 from records written before it."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.metering import rollups
from bastion.metering.hourly import SUMS, rebuild
from bastion.metering.reports import summarize
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter, write_batch
from bastion.store.db import alembic_config, make_engine, upgrade
from bastion.store.schema import ROLLUP_DIMENSIONS, usage, usage_hourly

T0 = datetime(2026, 11, 3, 7, 0, tzinfo=UTC)
PRICES = {
    "USD": PriceSettings(currency="USD", prompt=0.15, cached_prompt=0.075, completion=0.6),
    "EUR": PriceSettings(currency="EUR", prompt=2.5, completion=10),
}


def make_records(n: int, seed: int = 7, start: datetime = T0) -> list[UsageRecord]:
    """Records over ~3 days with every dimension varied, some unpriced, some failed."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        team = rnd.choice(["alpha", "beta", "gamma", None])
        model = rnd.choice(["tiny", "heavy", "free", "router"])
        r = UsageRecord(
            request_id=f"rq-{seed}-{i}",
            endpoint=rnd.choice(["chat", "completions", "embeddings"]),
            ts=start + timedelta(seconds=rnd.randrange(3 * 86400)),
            key_id=rnd.choice(["k1", "k2", "k3", None]),
            team=team,
            cost_center={"alpha": "cc-1", "beta": "cc-1", "gamma": "cc-2"}.get(team or ""),
            user=rnd.choice(["ann", "bob", None]),
            model=model,
            served_model="tiny" if model == "router" else None,
            adapter="sql@1" if rnd.random() < 0.1 else None,
            prompt_tokens=rnd.randrange(0, 5000),
            completion_tokens=rnd.randrange(0, 800),
            outcome=rnd.choice(["ok"] * 8 + ["client_error", "upstream_error"]),
            latency_ms=rnd.choice([3.0, 10.0, 10.5, 42.0, 260.0, 999.9, 7000.0, 90000.0]),
            ttft_ms=rnd.choice([None, 9.0, 25.0, 120.0, 480.0]),
        )
        r.cached_tokens = rnd.randrange(0, r.prompt_tokens + 1)
        r.price(None if model == "free" else PRICES["EUR" if model == "heavy" else "USD"])
        out.append(r)
    return out


def _rollup_rows(engine: sa.Engine) -> dict[tuple[Any, ...], dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage_hourly)).mappings().all()
    out = {}
    for r in rows:
        hour = r["hour"] if r["hour"].tzinfo else r["hour"].replace(tzinfo=UTC)
        out[(hour, *(r[d] for d in ROLLUP_DIMENSIONS))] = {s: r[s] for s in SUMS}
    return out


def _assert_same(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for s in SUMS:
            if s.endswith("_ms_sum"):  # float sums: the order of additions differs
                assert a[k][s] == pytest.approx(b[k][s], rel=1e-9), (k, s)
            else:
                assert a[k][s] == b[k][s], (k, s)


def _raw_totals(engine: sa.Engine) -> dict[str | None, tuple[int, ...]]:
    q = sa.select(
        usage.c.currency,
        sa.func.count(),
        sa.func.sum(usage.c.prompt_tokens),
        sa.func.sum(usage.c.cached_tokens),
        sa.func.sum(usage.c.completion_tokens),
        sa.func.sum(usage.c.cost_micros),
    ).group_by(usage.c.currency)
    with engine.connect() as conn:
        return {r[0]: tuple(int(x) for x in r[1:]) for r in conn.execute(q)}


def test_rollups_equal_the_records(engine: sa.Engine) -> None:
    recs = make_records(1500)
    writer = UsageWriter(engine, flush_seconds=0.02)
    writer.open()
    for r in recs[:1000]:
        writer.add(r)
    writer.close()
    # A retried batch that was partly written: 1000-1099 land, then 1050-1499 is written again
    # as one batch; its duplicates make it fall back to row by row (the duplicate-skip path).
    rows = [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs]
    write_batch(engine, rows[1000:1100])
    write_batch(engine, rows[1050:1500])
    write_batch(engine, rows[:10])  # every one a duplicate: nothing may be added twice

    written = _rollup_rows(engine)
    totals = _raw_totals(engine)
    assert sum(t[0] for t in totals.values()) == 1500
    by_currency: dict[str | None, list[int]] = {}
    for k, v in written.items():
        t = by_currency.setdefault(k[-1] or None, [0] * 5)
        for i, s in enumerate(
            ["requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros"]
        ):
            t[i] += v[s]
    assert {c: tuple(t) for c, t in by_currency.items()} == totals
    rebuild(engine)  # the SQL aggregation of the records, independent of the writer's code
    _assert_same(written, _rollup_rows(engine))
    assert sum(v["lat_12"] for v in written.values()) == sum(
        1 for r in recs if r.latency_ms > 60000
    )
    assert sum(v["ttft_count"] for v in written.values()) == sum(
        1 for r in recs if r.ttft_ms is not None
    )


def test_summaries_from_rollups_equal_raw(engine: sa.Engine) -> None:
    recs = make_records(600, seed=11)
    write_batch(engine, [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs])
    since, until = T0 + timedelta(minutes=37), T0 + timedelta(days=2, minutes=5)
    for by in ("team", "cost-center", "model", "key", "user", "day"):
        got = summarize(engine, by, since, until)  # type: ignore[arg-type]
        want: dict[tuple[Any, Any], list[int]] = {}
        for r in recs:
            if not since <= r.ts < until:
                continue
            g = {
                "team": r.team,
                "cost-center": r.cost_center,
                "model": r.model,
                "key": r.key_id,
                "user": r.user,
                "day": r.ts.strftime("%Y-%m-%d"),
            }[by]
            w = want.setdefault((g if g is not None else "(none)", r.currency), [0, 0, 0])
            w[0] += 1
            w[1] += r.prompt_tokens
            w[2] += r.cost_micros
        assert {
            (row[by], row["currency"]): [
                row["requests"],
                row["prompt_tokens"],
                int(row["cost"].replace(".", "")),
            ]
            for row in got
        } == want, by
    inside = summarize(engine, "team", T0 + timedelta(minutes=1), T0 + timedelta(minutes=59))
    assert sum(r["requests"] for r in inside) == sum(
        1 for r in recs if T0 + timedelta(minutes=1) <= r.ts < T0 + timedelta(minutes=59)
    )


def test_series_and_percentiles(engine: sa.Engine) -> None:
    recs = make_records(400, seed=3)
    write_batch(engine, [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs])
    day = rollups.series(engine, "day", T0, T0 + timedelta(days=3), by=["model"])
    assert sum(r["requests"] for r in day) == 400
    hourly = rollups.series(engine, "hour", T0, T0 + timedelta(days=3), team="alpha")
    assert all(r["period"].minute == 0 for r in hourly)
    assert sum(r["requests"] for r in hourly) == sum(1 for r in recs if r.team == "alpha")
    with pytest.raises(ValueError, match="whole hours"):
        rollups.usage_by(engine, ["team"], T0 + timedelta(minutes=1))
    by_key = rollups.usage_by(engine, ["key", "user"], T0, T0 + timedelta(days=3))
    assert sum(r["requests"] for r in by_key) == 400 and "latency_ms_p95" in by_key[0]


def test_percentile_by_hand() -> None:
    # Buckets (0,10] x 10 and (10,25] x 10: the median is the 10th value -> 10 ms; the 75th
    # percentile is halfway into (10, 25] -> 17.5 ms; beyond the last bound, the bound itself.
    hist = [10, 10] + [0] * 11
    assert rollups.percentile(hist, 0.5) == 10.0
    assert rollups.percentile(hist, 0.75) == 17.5
    assert rollups.percentile([0] * 12 + [4], 0.99) == 60000.0
    assert rollups.percentile([0] * 13, 0.5) is None
    assert rollups.month_range("2026-12")[1] == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a month"):
        rollups.month_range("2026-13")


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migration_fills_rollups_from_existing_records(kind: str, tmp_path: Path) -> None:
    from alembic import command

    from tests.conftest import pg_database

    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path}/m.db"
            if kind == "sqlite"
            else stack.enter_context(pg_database(migrate=False))
        )
        eng = make_engine(url)
        stack.callback(eng.dispose)
        cfg = alembic_config(url)
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0013")
        recs = make_records(300, seed=5)
        rows = [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs]
        with eng.begin() as conn:
            conn.execute(usage.insert(), rows)
        upgrade(eng)  # 0014 aggregates what is there, in SQL of its own
        migrated = _rollup_rows(eng)
        rebuild(eng)
        _assert_same(migrated, _rollup_rows(eng))
        assert sum(v["requests"] for v in migrated.values()) == 300


def test_rebuild_rollups_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    url = f"sqlite:///{tmp_path}/cli.db"
    eng = make_engine(url)
    upgrade(eng)
    write_batch(eng, [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in make_records(200)])
    written = _rollup_rows(eng)
    with eng.begin() as conn:  # lost, or damaged by hand: the records are the truth
        conn.execute(usage_hourly.delete().where(usage_hourly.c.team == "alpha"))
        conn.execute(usage_hourly.update().values(requests=usage_hourly.c.requests + 1))
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": url}}))
    run = [sys.executable, "-m", "bastion.cli", "report", "rebuild-rollups", "-c", str(cfg)]
    part = subprocess.run([*run, "--since", "2026-11-04T00:30", "--until", "2026-11-05"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert part.stdout.startswith("rebuilt ")
    now = _rollup_rows(eng)
    for k, v in now.items():  # inside the window (rounded out to whole hours): right again
        inside = datetime(2026, 11, 4, tzinfo=UTC) <= k[0] < datetime(2026, 11, 5, tzinfo=UTC)
        assert (v["requests"] == written[k]["requests"]) is inside
    subprocess.run(run, capture_output=True, text=True, check=True)
    _assert_same(written, _rollup_rows(eng))
    bad = subprocess.run([*run, "--since", "yesterday-ish"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a time" in bad.stderr
    eng.dispose()


def test_concurrent_writers_add_up(engine: sa.Engine) -> None:
    """Two replicas' writers upserting the same hours at once: no deadlock, nothing lost."""
    import threading

    recs = make_records(1200, seed=31, start=T0)
    rows = [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs]
    errors: list[BaseException] = []

    def writer(part: list[dict[str, Any]]) -> None:
        try:
            for i in range(0, len(part), 50):
                write_batch(engine, part[i : i + 50])
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(rows[n::3],)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    written = _rollup_rows(engine)
    rebuild(engine)
    _assert_same(written, _rollup_rows(engine))


def test_rebuild_counts_its_rows(engine: sa.Engine) -> None:
    write_batch(
        engine, [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in make_records(100)]
    )
    assert rebuild(engine) == len(_rollup_rows(engine)) > 0
