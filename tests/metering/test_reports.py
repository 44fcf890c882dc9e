"""Usage summaries and `bastion usage`, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from bastion.metering.reports import render, summarize
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly


def _records(now: datetime) -> list[UsageRecord]:
    recs = []
    for i, (team, cc, model, p, c, outcome) in enumerate(
        [
            ("alpha", "cc-1", "tiny", 100, 10, "ok"),
            ("alpha", "cc-1", "tiny", 50, 5, "ok"),
            ("beta", "cc-2", "minilm", 30, 0, "ok"),
            ("beta", "cc-2", "tiny", 0, 0, "client_error"),
        ]
    ):
        r = UsageRecord(
            request_id=f"req_{i}_{now.timestamp()}",
            endpoint="chat",
            team=team,
            cost_center=cc,
            model=model,
            prompt_tokens=p,
            completion_tokens=c,
            cached_tokens=p // 2,
            outcome=outcome,
            ts=now - timedelta(days=i % 2),
        )
        r.price(PriceSettings(currency="USD", prompt=1.0, cached_prompt=0.5, completion=2.0))
        recs.append(r)
    return recs


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/u.db"
    return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]


def test_writer_and_summaries(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:  # the session's PostgreSQL database is shared: start empty
        conn.execute(usage.delete())
        conn.execute(usage_hourly.delete())
    writer = UsageWriter(engine, flush_seconds=0.05)
    writer.open()
    now = datetime.now(UTC)
    for r in _records(now):
        writer.add(r)
    writer.add(_records(now)[0])  # a duplicate request id is written once (idempotent)
    writer.close()  # drains everything before returning
    by_team = {r["team"]: r for r in summarize(engine, "team")}
    assert by_team["alpha"]["requests"] == 2 and by_team["alpha"]["prompt_tokens"] == 150
    assert by_team["alpha"]["cached_tokens"] == 75 and by_team["beta"]["errors"] == 1
    # Per record, in micro-units: 50 + 50 x 0.5 + 10 x 2 = 95, and 25 + 25 x 0.5 + 5 x 2 = 47.5,
    # charged as 48 (half up): an exact decimal string, the same in every format.
    assert by_team["alpha"]["cost"] == "0.000143" and by_team["alpha"]["currency"] == "USD"
    by_cc = summarize(engine, "cost-center")
    assert [r["cost-center"] for r in by_cc] == ["cc-1", "cc-2"]
    days = summarize(engine, "day")
    assert len(days) == 2 and sum(d["requests"] for d in days) == 4
    assert days[-1]["day"] == now.strftime("%Y-%m-%d")
    recent = summarize(engine, "model", since=now - timedelta(hours=1))
    assert sum(r["requests"] for r in recent) == 2
    assert summarize(engine, "team", team="beta")[0]["team"] == "beta"
    engine.dispose()


def test_render_formats() -> None:
    rows = [{"team": "a", "requests": 2, "cost": 0.5}]
    assert "team" in render(rows, "table") and "0.500000" in render(rows, "table")
    assert list(csv.DictReader(io.StringIO(render(rows, "csv"))))[0]["requests"] == "2"
    assert json.loads(render(rows, "json")) == rows


def test_usage_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/u.db"
    engine = make_engine(url)
    upgrade(engine)
    writer = UsageWriter(engine, 0.05)
    writer.open()
    for r in _records(datetime.now(UTC)):
        writer.add(r)
    writer.close()
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": url}}))
    run = [sys.executable, "-m", "bastion.cli", "usage", "-c", str(cfg)]
    out = subprocess.run(
        [*run, "--by", "cost-center", "--format", "csv"], capture_output=True, text=True, check=True
    ).stdout
    assert list(csv.DictReader(io.StringIO(out)))[0]["cost-center"] == "cc-1"
    js = subprocess.run(
        [*run, "--by", "model", "--since", "12h", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert {r["model"] for r in json.loads(js)} == {"tiny", "minilm"}
    bad = subprocess.run([*run, "--since", "last tuesday"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a time" in bad.stderr
