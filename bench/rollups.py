"""A month of usage summed from the hourly rollups against the same sums from the raw usage
records, side by side (issue 15, item 2).

    PYTHONPATH=src .venv/bin/python -m bench.rollups --rows 1000000 --db sqlite
    PYTHONPATH=src .venv/bin/python -m bench.rollups --rows 1000000 --db postgresql+psycopg://postgres@127.0.0.1/postgres

Writes `--rows` usage records spread over November 2026 through the usage writer's own path
(`write_batch`: records and rollups in one transaction), then times each summary a few times
and prints the median. Traffic is shaped like a bank's: 200 API keys (each an application of
one team, cost center and user) with Zipf-like volumes, each using two of six models. The
database is a new one (a temporary SQLite file, or a scratch PostgreSQL database dropped after).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bastion.metering import rollups
from bastion.metering.hourly import rebuild
from bastion.metering.reports import summarize_raw
from bastion.metering.usage import write_batch
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
MODELS = [("tiny", "USD"), ("heavy", "EUR"), ("coder", "USD"), ("sql-adapter", "USD"),
          ("minilm", "USD"), ("auto", "USD")]  # fmt: skip


def traffic(n: int, seed: int = 1) -> Any:
    rnd = random.Random(seed)
    keys = []
    for k in range(200):
        team = f"team-{k % 20:02d}"
        keys.append(
            {
                "key_id": f"key{k:04d}",
                "team": team,
                "cost_center": f"cc-{k % 5}",
                "user": f"user{k % 120}",
                "models": rnd.sample(MODELS, 2),
            }
        )
    weights = [1 / (i + 1) ** 1.1 for i in range(len(keys))]
    span = int((END - START).total_seconds())
    for i, key in enumerate(rnd.choices(keys, weights, k=n)):
        model, currency = rnd.choice(key["models"])
        prompt, completion = rnd.randrange(50, 4000), rnd.randrange(0, 700)
        cached = rnd.randrange(0, prompt) if rnd.random() < 0.4 else 0
        yield {
            "request_id": f"b{seed}-{i}",
            "endpoint": "embeddings" if model == "minilm" else "chat",
            "ts": START + timedelta(seconds=rnd.randrange(span)),
            "key_id": key["key_id"],
            "team": key["team"],
            "cost_center": key["cost_center"],
            "user": key["user"],
            "client_user": None,
            "model": model,
            "served_model": "tiny" if model == "auto" else None,
            "deployment": None,
            "adapter": "sql@3" if model == "sql-adapter" else None,
            "stream": True,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "completion_tokens": completion,
            "cost_micros": prompt * 15 // 100 + completion * 60 // 100,
            "currency": currency,
            "status": 200,
            "outcome": "ok" if rnd.random() < 0.98 else "upstream_error",
            "error_code": None,
            "latency_ms": rnd.lognormvariate(6, 0.8),
            "ttft_ms": rnd.lognormvariate(4.5, 0.7),
            "tokens_estimated": False,
        }


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, out


def run(url: str, rows: int, batch: int, repeat: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    t = time.perf_counter()
    buf: list[dict[str, Any]] = []
    for r in traffic(rows):
        buf.append(r)
        if len(buf) == batch:
            write_batch(engine, buf)
            buf = []
    if buf:
        write_batch(engine, buf)
    load_s = time.perf_counter() - t
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    with engine.connect() as conn:
        n_usage = conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one()
        n_roll = conn.execute(sa.select(sa.func.count()).select_from(usage_hourly)).scalar_one()
    rate = n_usage / load_s
    print(f"{engine.dialect.name}: {n_usage:,} usage rows, {n_roll:,} rollup rows, written in "
          f"{load_s:.1f} s ({rate:,.0f} rows/s with rollups, batches of {batch})")  # fmt: skip
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = []
    for by in ("team", "cost-center", "model", "key", "user"):
        cases.append(
            (
                f"month by {by}",
                lambda by=by: rollups.aggregate(engine, [by], START, END),
                lambda by=by: summarize_raw(engine, by, START, END, None),  # type: ignore[arg-type]
            )
        )
    cases.append(
        (
            "month by day",
            lambda: rollups.aggregate(engine, [], START, END, step="day"),
            lambda: summarize_raw(engine, "day", START, END, None),
        )
    )
    cases.append(
        (
            "one team, by day",
            lambda: rollups.aggregate(engine, [], START, END, {"team": "team-03"}, step="day"),
            lambda: summarize_raw(engine, "day", START, END, "team-03"),
        )
    )
    print("\n| summary | rollups (ms) | raw usage (ms) | speed-up | groups |")
    print("|---|---:|---:|---:|---:|")
    for name, fast, slow in cases:
        f_ms, f_out = timed(fast, repeat)
        s_ms, s_out = timed(slow, repeat)
        # The two must agree: requests per group and currency.
        assert sum(r["requests"] for r in f_out) == sum(r.requests for r in s_out), name
        print(f"| {name} | {f_ms:,.1f} | {s_ms:,.1f} | {s_ms / f_ms:,.1f}x | {len(f_out)} |")
    extra: list[tuple[str, Callable[[], Any]]] = [
        ("month by model, p50/p95/p99", lambda: rollups.usage_by(engine, ["model"], START, END)),
        ("hourly series by model", lambda: rollups.series(engine, "hour", START, END, ["model"])),
        ("rebuild-rollups (whole month)", lambda: rebuild(engine)),
    ]
    print("\n| rollups only | ms | rows |\n|---|---:|---:|")
    for name, fn in extra:
        ms, out = timed(fn, 1 if "rebuild" in name else repeat)
        print(f"| {name} | {ms:,.1f} | {out if isinstance(out, int) else len(out)} |")
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000, help="records per transaction")
    ap.add_argument("--repeat", type=int, default=5, help="runs per query (median shown)")
    ap.add_argument("--db", default="sqlite", help="'sqlite' or a PostgreSQL server URL")
    args = ap.parse_args()
    if args.db == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            run(f"sqlite:///{Path(d) / 'bench.db'}", args.rows, args.batch, args.repeat)
        return
    with scratch_database(args.db, "bastion_bench_") as url:
        run(url, args.rows, args.batch, args.repeat)


@contextlib.contextmanager
def scratch_database(server: str, prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database on `server` (a URL naming any database there), dropped
    after, even with connections still open."""
    name = prefix + secrets.token_hex(4)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()
