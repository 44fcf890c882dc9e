"""The GPU-hour price book and `bastion report tco`: the arithmetic against numbers worked out
by hand (docs/chargeback.md walks through the same ones), the settings' checks, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.config import ConfigError, parse_settings
from bastion.metering.tco import Tokens, compare, gpu_hour, month_hours, per_million, verdict
from bastion.metering.tco_settings import TcoModel, VendorPrice
from bastion.metering.usage import UsageRecord, write_batch
from bastion.store.db import make_engine, upgrade

OWNED: dict[str, Any] = {
    "gpus": 3,
    # 26,280 over 3 years (26,280 h) = 1.00/GPU-h; 1 kW at 0.25/kWh = 0.25; +20 % ops = 1.50.
    "owned": {"purchase_price": "26280", "years": 3, "power_kw": 1, "price_per_kwh": "0.25"},
    "ops_share": "0.2",
    "throughput_tokens_per_second": 1250,
    "utilisation": "0.8",
    "cached_prompt_ratio": "0.2",
    "vendor_model": "big-1",
}
VENDOR: dict[str, Any] = {
    "name": "Example AI",
    "as_of": "2026-10-15",
    "currency": "USD",
    "models": {"big-1": {"prompt": "3.00", "cached_prompt": "1.50", "completion": "15.00"}},
}
#: 200M uncached + 120M cached prompt tokens, 100M completion tokens.
MONTH = Tokens(prompt=320_000_000, cached=120_000_000, completion=100_000_000)


def test_gpu_hour_and_price_per_million_by_hand() -> None:
    m = TcoModel.model_validate(OWNED)
    assert gpu_hour(m) == Decimal("1.50")
    # 1.50 x 3 GPUs = 4.50/h for 1250 x 3600 = 4.5M tokens/h: 1.00 per 1M at full use,
    # 1.25 at the planned 80 %; a cached prompt token a fifth of that.
    assert per_million(m) == Decimal("1.25")
    assert per_million(m, Decimal(1)) == Decimal("1.00")
    leased = TcoModel.model_validate(
        {**OWNED, "owned": None, "leased": {"price_per_gpu_hour": "2.50"}, "ops_share": "0.2"}
    )
    assert gpu_hour(leased) == Decimal("3.00") and per_million(leased) == Decimal("2.50")


def test_a_low_volume_month_costs_more_self_hosted() -> None:
    m = TcoModel.model_validate(OWNED)
    vendor = VendorPrice.model_validate(VENDOR["models"]["big-1"])
    r = compare(m, vendor, MONTH, Decimal(720))  # November: 720 h
    assert r["self_cost"] == Decimal("3240.00")  # 4.50/h x 720 h, paid whether used or not
    # Weighted tokens: 200M + 100M + 0.2 x 120M = 324M of a capacity of 1250 x 3600 x 720 =
    # 3,240M: 10 % utilisation, so 3240 / 324M tokens = 10.00 per 1M (at 80 % it would be 1.25).
    assert r["utilisation"] == Decimal("0.1")
    assert r["per_million_actual"] == Decimal("10")
    assert r["self_cost_at_planned_price"] == Decimal("405.00")
    # The vendor: 200M x 3.00 + 120M x 1.50 + 100M x 15.00 per 1M = 600 + 180 + 1500.
    assert r["vendor_cost"] == Decimal("2280")
    assert r["savings"] == Decimal("-960")
    # Break-even: 3240 / 2280 = 1.42105... times the volume (420M tokens) and the utilisation.
    assert r["break_even_tokens"] == Decimal(596_842_105)
    assert r["break_even_utilisation"].quantize(Decimal("0.0001")) == Decimal("0.1421")
    assert verdict(r) == "self-hosting costs more at this volume"


def test_a_high_volume_month_saves_and_an_idle_one_cannot_break_even() -> None:
    m = TcoModel.model_validate(OWNED)
    vendor = VendorPrice.model_validate(VENDOR["models"]["big-1"])
    five = Tokens(MONTH.prompt * 5, MONTH.cached * 5, MONTH.completion * 5)
    r = compare(m, vendor, five, Decimal(720))
    assert r["utilisation"] == Decimal("0.5") and r["vendor_cost"] == Decimal("11400")
    assert r["savings"] == Decimal("8160") and verdict(r) == "self-hosting is cheaper"
    idle = compare(m, vendor, Tokens(), Decimal(720))
    assert idle["savings"] == Decimal("-3240") and idle["break_even_tokens"] is None
    assert verdict(idle) == "no priced usage: the capacity is all cost"
    tiny = compare(m, vendor, Tokens(1000, 0, 10), Decimal(720))
    assert tiny["break_even_utilisation"] < 1
    slow = TcoModel.model_validate({**OWNED, "throughput_tokens_per_second": 1})
    r = compare(slow, vendor, Tokens(1_000_000, 0, 0), Decimal(720))
    assert verdict(r) == "self-hosting costs more and cannot break even at this throughput"


def test_month_hours() -> None:
    nov_done = datetime(2026, 12, 3, tzinfo=UTC)
    assert month_hours("2026-11", nov_done)[2] == Decimal(720)
    assert month_hours("2026-11", datetime(2026, 11, 2, 6, tzinfo=UTC))[2] == Decimal(30)
    with pytest.raises(ValueError, match="has not begun"):
        month_hours("2027-01", nov_done)


def _cfg(**tco: Any) -> dict[str, Any]:
    dep = {"url": "http://127.0.0.1:8001", "served_name": "m"}
    return {
        "models": {"tiny": {"deployments": [dep]}, "router-ish": {"deployments": [dep]}},
        "tco": {"models": {"tiny": OWNED}, "vendor": VENDOR, **tco},
    }


def _err(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, "bastion.yaml")
    return str(info.value)


def test_settings_are_checked_at_load() -> None:
    s = parse_settings(_cfg())
    assert s.tco.vendor.as_of.isoformat() == "2026-10-15"
    both = {**OWNED, "leased": {"price_per_gpu_hour": 2}}
    assert "exactly one of `owned` and `leased`" in _err(_cfg(models={"tiny": both}))
    assert "unknown model 'nope'" in _err(_cfg(models={"nope": OWNED}))
    other = {**OWNED, "vendor_model": "gpt-9"}
    assert "'gpt-9' is not in tco.vendor.models" in _err(_cfg(models={"tiny": other}))
    eur = {**VENDOR, "currency": "EUR"}
    assert "converts no currency" in _err(_cfg(vendor=eur))
    assert "needs tco.vendor" in _err(_cfg(vendor=None))
    assert "utilisation" in _err(_cfg(models={"tiny": {**OWNED, "utilisation": "1.5"}}))
    assert "as_of" in _err(_cfg(vendor={**VENDOR, "as_of": "last week"}))


def test_tco_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    eng = make_engine(url)
    upgrade(eng)
    # October 2026 (744 h, over): the month's tokens in 4 records, two through a router.
    rows = []
    for i in range(4):
        r = UsageRecord(
            request_id=f"t{i}",
            endpoint="chat",
            ts=datetime(2026, 10, 5 + i, 12, tzinfo=UTC),
            model="router-ish" if i % 2 else "tiny",
            served_model="tiny" if i % 2 else None,
            prompt_tokens=MONTH.prompt // 4,
            cached_tokens=MONTH.cached // 4,
            completion_tokens=MONTH.completion // 4,
        )
        rows.append({f: getattr(r, f) for f in UsageRecord.__slots__})
    write_batch(eng, rows)
    eng.dispose()
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**_cfg(), "database": {"url": url}}))
    run = [sys.executable, "-m", "bastion.cli", "report", "tco", "-c", str(cfg)]
    out = subprocess.run(
        [*run, "--month", "2026-10", "--format", "json"], capture_output=True, text=True, check=True
    )
    (row,) = json.loads(out.stdout)
    # 744 h x 4.50 = 3348; the vendor's cost of the same tokens is the month's 2280 above.
    assert row["self_cost"] == "3348.000000" and row["vendor_cost"] == "2280.000000"
    assert row["savings"] == "-1068.000000" and row["per_1m_planned"] == "1.250000"
    assert row["prompt_tokens"] == MONTH.prompt and row["currency"] == "USD"
    assert row["vendor"] == "Example AI big-1 (2026-10-15)"
    assert row["verdict"] == "self-hosting costs more at this volume"
    table = subprocess.run([*run, "--month", "2026-10"], capture_output=True, text=True, check=True)
    assert "break_even_utilisation" in table.stdout and "3348.000000" in table.stdout
    bad = subprocess.run([*run, "--month", "2026-1O"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a month" in bad.stderr
