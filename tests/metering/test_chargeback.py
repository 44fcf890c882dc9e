"""`bastion report chargeback`: FOCUS rows that reconcile with the usage records to the
micro-unit, per currency, on SQLite and PostgreSQL, and through the CLI."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from bastion.metering.chargeback import EXTRA_COLUMNS, FOCUS_COLUMNS, chargeback, totals
from bastion.metering.usage import UsageRecord, write_batch
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage
from tests.metering.test_rollups import make_records


def _month_records() -> list[UsageRecord]:
    recs = make_records(900, seed=21, start=datetime(2026, 11, 2, tzinfo=UTC))
    recs += make_records(100, seed=22, start=datetime(2026, 10, 29, tzinfo=UTC))  # both months
    edge = make_records(2, seed=23)
    edge[0].ts = datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)  # the last instant: in
    edge[1].ts = datetime(2026, 12, 1, tzinfo=UTC)  # the next month's first: out
    return recs + edge


def _rows(recs: list[UsageRecord]) -> list[dict[str, Any]]:
    return [{f: getattr(r, f) for f in UsageRecord.__slots__} for r in recs]


def _raw(engine: sa.Engine) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], int]]:
    """Cost micro-units and tokens per (cost center, team, model, day, currency), in SQL."""
    lo, hi = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    q = sa.select(usage).where(usage.c.ts >= lo, usage.c.ts < hi)
    cost: dict[tuple[Any, ...], int] = defaultdict(int)
    tokens: dict[tuple[Any, ...], int] = defaultdict(int)
    with engine.connect() as conn:
        for r in conn.execute(q):
            ts = r.ts if r.ts.tzinfo else r.ts.replace(tzinfo=UTC)
            key = (r.cost_center or "", r.team or "", r.model or "", ts.strftime("%Y-%m-%d"))
            cost[(*key, r.currency or "USD")] += r.cost_micros
            tokens[(*key, r.currency or "USD")] += r.prompt_tokens + r.completion_tokens
    return cost, tokens


def test_chargeback_reconciles_with_the_records(engine: sa.Engine) -> None:
    write_batch(engine, _rows(_month_records()))
    rows = chargeback(engine, "2026-11", "USD")
    cost, tokens = _raw(engine)
    got_cost = {
        (
            r["BillingAccountId"],
            r["SubAccountId"],
            r["ResourceName"],
            r["ChargePeriodStart"][:10],
            r["BillingCurrency"],
        ): int(Decimal(r["BilledCost"]).scaleb(6))
        for r in rows
    }
    assert len(got_cost) == len(rows)  # one row per cost center x team x model x day x currency
    assert got_cost == dict(cost)
    assert {k: r["ConsumedQuantity"] for k, r in zip(got_cost, rows, strict=True)} == dict(tokens)
    # The totals per currency, to the micro-unit, as exact strings.
    want: dict[str, int] = defaultdict(int)
    for k, v in cost.items():
        want[k[-1]] += v
    assert totals(rows) == {c: format(Decimal(v).scaleb(-6), "f") for c, v in want.items()}
    first = rows[0]
    day = datetime.fromisoformat(first["ChargePeriodStart"])
    assert datetime.fromisoformat(first["ChargePeriodEnd"]) == day + timedelta(days=1)
    assert first["BillingPeriodStart"] == "2026-11-01T00:00:00Z"
    assert first["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
    assert first["Tags"] == {
        "team": first["SubAccountId"],
        "cost_center": first["BillingAccountId"],
    }
    assert all(r["ChargePeriodStart"].startswith("2026-11-") for r in rows)
    assert {r["BilledCost"] == r["EffectiveCost"] == r["ListCost"] for r in rows} == {True}
    assert all(
        not r["x_Priced"] and r["BilledCost"] == "0.000000"
        for r in rows
        if r["ResourceName"] == "free"
    )


def test_chargeback_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    eng = make_engine(url)
    upgrade(eng)
    write_batch(eng, _rows(_month_records()))
    cost, _ = _raw(eng)
    eng.dispose()
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": url}, "metering": {"currency": "USD"}}))
    run = [sys.executable, "-m", "bastion.cli", "report", "chargeback", "-c", str(cfg)]
    out = tmp_path / "nov.csv"
    done = subprocess.run(
        [*run, "--month", "2026-11", "--out", str(out)], capture_output=True, text=True, check=True
    )
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == [*FOCUS_COLUMNS, *EXTRA_COLUMNS]
    by_currency: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        by_currency[r["BillingCurrency"]] += Decimal(r["BilledCost"])
        tags = json.loads(r["Tags"])
        assert tags == {"cost_center": r["BillingAccountId"], "team": r["SubAccountId"]}
    for c in ("USD", "EUR"):
        micros = sum(v for k, v in cost.items() if k[-1] == c)
        assert by_currency[c] == Decimal(micros).scaleb(-6)
        assert f"{Decimal(micros).scaleb(-6):f} {c}" in done.stderr
    js = subprocess.run(
        [*run, "--month", "2026-11", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    assert len(json.loads(js)) == len(rows) and '"BilledCost": "' in js  # strings, never floats
    bad = subprocess.run([*run, "--month", "November"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a month: 'November'" in bad.stderr
