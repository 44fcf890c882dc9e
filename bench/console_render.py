"""Console page and API render times over a month of 10^6 usage records (issue 15, item 2).

    PYTHONPATH=src .venv/bin/python -m bench.console_render --rows 1000000 \\
        --db postgresql+psycopg://postgres@127.0.0.1/postgres

Creates a scratch PostgreSQL database (dropped after), bulk-loads `--rows` usage records
spread over the 30 days before now with `COPY` (the traffic shape of `bench/rollups.py`: 200
API keys, Zipf-like volumes, six models), then builds their hourly rollups with
`bastion report rebuild-rollups`' own function (the gateway's writer keeps them in step as it
writes; a bulk load has to build them once). Then it starts a real `bastion serve` on that
database with directory sign-in against the test suite's slapd (the console has no other
sign-in), signs in as an auditor (everyone's usage: the biggest reads) and as a member, and
times every console page and JSON endpoint over HTTP: `--repeat` runs after one warm-up,
median and max in ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bastion.metering.hourly import rebuild
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly
from bench.rollups import scratch_database, traffic
from tests.conftest import Gateway, base_config
from tests.identity.slapd import PASSWORDS, Slapd
from tests.metering.test_tco import OWNED, VENDOR

COLUMNS = (
    "request_id", "ts", "endpoint", "key_id", "team", "cost_center", "user", "client_user",
    "model", "served_model", "deployment", "adapter", "stream", "prompt_tokens",
    "cached_tokens", "completion_tokens", "cost_micros", "currency", "status", "outcome",
    "error_code", "latency_ms", "ttft_ms", "tokens_estimated",
)  # fmt: skip
DEAD = {"deployments": [{"url": "http://127.0.0.1:9/v1", "served_name": "x"}]}


def records(n: int, now: datetime) -> Iterator[dict[str, Any]]:
    """`bench.rollups`' traffic moved to the 30 days before `now`; key0000's records are the
    member alice's (team alpha), so her scoped pages read real rows too."""
    span = timedelta(days=30)
    start = now - span
    shift = start - datetime(2026, 11, 1, tzinfo=UTC)
    for r in traffic(n):
        r["ts"] = r["ts"] + shift
        if r["ts"] >= now:
            r["ts"] = now - timedelta(seconds=1)
        if r["key_id"] == "key0000":
            r["team"], r["user"] = "alpha", "alice"
        yield r


def load(engine: sa.Engine, n: int, now: datetime) -> tuple[float, float]:
    """COPY the records in, then build the rollups; returns both durations in seconds."""
    t = time.perf_counter()
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:  # type: ignore[attr-defined]
            cols = ", ".join(f'"{c}"' for c in COLUMNS)
            sql = f"COPY usage ({cols}) FROM STDIN"
            with cur.copy(sql) as copy:
                for r in records(n, now):
                    copy.write_row([r[c] for c in COLUMNS])
        raw.commit()
    finally:
        raw.close()
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    rebuild(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    return loaded, time.perf_counter() - t


def sign_in(client: httpx.Client, user: str) -> dict[str, str]:
    r = client.post("/auth/login", json={"username": user, "password": PASSWORDS[user]})
    r.raise_for_status()
    return {"Cookie": f"bastion_session={r.json()['token']}"}


def timed(client: httpx.Client, path: str, headers: dict[str, str], repeat: int) -> list[float]:
    times = []
    for i in range(repeat + 1):  # the first is a warm-up (imports, templates, plans)
        t = time.perf_counter()
        r = client.get(path, headers=headers)
        ms = (time.perf_counter() - t) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
        if i:
            times.append(ms)
    return times


def run(url: str, rows: int, repeat: int) -> None:
    now = datetime.now(UTC)
    month = now.strftime("%Y-%m")
    engine = make_engine(url)
    upgrade(engine)
    loaded, rolled = load(engine, rows, now)
    with engine.connect() as conn:
        n_usage = conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one()
        n_roll = conn.execute(sa.select(sa.func.count()).select_from(usage_hourly)).scalar_one()
    engine.dispose()
    print(f"{n_usage:,} usage records (COPY {loaded:.1f} s), {n_roll:,} rollup rows "
          f"(rebuilt + VACUUM ANALYZE {rolled:.1f} s)")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        slapd = Slapd(Path(d) / "slapd")
        slapd.start()
        cfg = base_config(
            url,
            {"tiny": DEAD, "heavy": DEAD},
            prices={"tiny": {"prompt": 0.15, "completion": 0.6}},
            tco={"models": {"tiny": OWNED, "heavy": {**OWNED, "gpus": 1}}, "vendor": VENDOR},
        )
        cfg["identity"].update(
            {
                "ldap": slapd.ldap_settings(),
                "group_mappings": [
                    {"group": "bastion-auditors", "team": "beta", "role": "auditor"},
                    {"group": "all-engineering", "team": "alpha"},
                ],
            }
        )
        (Path(d) / "gw").mkdir()
        gw = Gateway(cfg, Path(d) / "gw").start(timeout=60)
        try:
            with httpx.Client(base_url=gw.url, timeout=60) as client:
                pages = [
                    ("carol", "/console/?window=30d", "overview page"),
                    ("carol", "/console/api/overview?window=1h", "overview API, 1h (records)"),
                    ("carol", "/console/api/overview?window=24h", "overview API, 24h"),
                    ("carol", "/console/api/overview?window=7d", "overview API, 7d"),
                    ("carol", "/console/api/overview?window=30d", "overview API, 30d"),
                    ("carol", "/console/usage?by=team", "usage page, by team (+ burn-down)"),
                    ("carol", "/console/usage?by=key", "usage page, by key (+ burn-down)"),
                    ("carol", "/console/usage?by=user", "usage page, by user (+ burn-down)"),
                    ("carol", "/console/api/burn-down", "burn-down API"),
                    ("carol", f"/console/chargeback?month={month}", "chargeback page"),
                    ("carol", f"/console/chargeback/download?month={month}&format=csv",
                     "chargeback CSV download"),
                    ("carol", f"/console/chargeback/download?month={month}&format=json",
                     "chargeback JSON download"),
                    ("carol", f"/console/cost-case?month={month}", "cost case page"),
                    ("carol", f"/console/api/cost-case?month={month}", "cost case API"),
                    ("alice", "/console/api/overview?window=30d", "member: overview API, 30d"),
                ]  # fmt: skip
                headers = {u: sign_in(client, u) for u in {u for u, _, _ in pages}}
                print(f"\n{repeat} runs each after a warm-up, over HTTP (month {month}):\n")
                print("| page or endpoint | as | median (ms) | max (ms) | bytes |")
                print("|---|---|---:|---:|---:|")
                for user, path, name in pages:
                    times = timed(client, path, headers[user], repeat)
                    size = len(client.get(path, headers=headers[user]).content)
                    print(f"| {name} | {user} | {statistics.median(times):,.1f} | "
                          f"{max(times):,.1f} | {size:,} |")  # fmt: skip
        finally:
            gw.stop()
            slapd.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per page (median shown)")
    ap.add_argument(
        "--db", default="postgresql+psycopg://postgres@127.0.0.1/postgres",
        help="a PostgreSQL server URL (a scratch database is made there and dropped)",
    )  # fmt: skip
    args = ap.parse_args()
    with scratch_database(args.db, "bastion_console_bench_") as url:
        run(url, args.rows, args.repeat)


if __name__ == "__main__":
    main()
