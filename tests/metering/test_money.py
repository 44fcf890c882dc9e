"""Money is exact: decimal prices, integer micro-units in the store, the counters and the
reports; a budget counts only its own currency, and no budgeted caller can reach a model its
budget cannot count."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from bastion.config import ConfigError, parse_settings
from bastion.metering.reports import render, summarize
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter
from bastion.store.db import alembic_config, make_engine, upgrade
from bastion.store.schema import usage

MODELS = {
    "priced": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "p"}]},
    "euro": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "e"}]},
    "free": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "f"}]},
}
PRICES = {"priced": {"prompt": "0.1"}, "euro": {"currency": "EUR", "prompt": "0.2"}}


def _config(**extra: object) -> dict[str, object]:
    teams = {"t": {"cost_center": "cc", "models": ["priced"]}, "u": {"cost_center": "cc2"}}
    cfg: dict[str, object] = {
        "cost_centers": {"cc": {}, "cc2": {}},
        "teams": teams,
        "models": MODELS,
        "prices": PRICES,
    }
    cfg.update(extra)
    return cfg


def _error(cfg: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg)
    return str(info.value)


def test_budgeted_callers_reach_only_models_priced_in_their_currency() -> None:
    # Team t reaches only 'priced' (USD): its USD budget is fine.
    parse_settings(
        _config(
            teams={"t": {"cost_center": "cc", "models": ["priced"], "limits": {"budget_day": 5}}}
        )
    )
    # Team u reaches every model: 'free' has no price, 'euro' is priced in EUR.
    msg = _error(_config(teams={"u": {"cost_center": "cc2", "limits": {"budget_day": 5}}}))
    reach = "teams.u.limits: a budget in USD, but its callers can reach model"
    assert f"{reach} 'free', which has no price" in msg
    assert f"{reach} 'euro', which is priced in EUR" in msg
    # Every other place a budget can be set in the file.
    for where, extra in [
        ("limits.defaults.key", {"limits": {"defaults": {"key": {"budget_month": 1}}}}),
        (
            "cost_centers.cc2.limits",
            {"cost_centers": {"cc": {}, "cc2": {"limits": {"budget_day": 1}}}},
        ),
        (
            "models.free.limits",
            {"models": {**MODELS, "free": {**MODELS["free"], "limits": {"budget_day": 1}}}},
        ),
    ]:
        assert f"{where}: a budget in USD, but its callers can reach model 'free'" in _error(
            _config(**extra)
        )
    bad = {"t": {"cost_center": "cc", "model_limits": {"free": {"budget_day": 1}}}}
    assert "teams.t.model_limits.free: a budget in USD" in _error(_config(teams=bad))
    # A budget kept in EUR may reach the EUR model, and only that one.
    eur = {"cost_center": "cc2", "models": ["euro"], "limits": {"budget_day": 1, "currency": "EUR"}}
    parse_settings(_config(teams={"u": eur}))
    assert "can reach model 'priced', which is priced in USD" in _error(
        _config(teams={"u": {**eur, "models": ["euro", "priced"]}})
    )
    # The default currency is a setting; rate limits alone need no price.
    parse_settings(
        _config(
            metering={"currency": "EUR"},
            teams={"u": {**eur, "models": ["euro"], "limits": {"budget_day": 1}}},
        )
    )
    parse_settings(_config(teams={"u": {"cost_center": "cc2", "limits": {"rpm": 5}}}))
    # Money is exact: no float that cannot be a micro-unit amount.
    assert "budget_day" in _error(_config(limits={"defaults": {"key": {"budget_day": 0.1 + 0.2}}}))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    from tests.conftest import pg_database

    ctx = pg_database(migrate=False)  # the migration test starts from an older schema
    request.addfinalizer(lambda: ctx.__exit__(None, None, None))
    return ctx.__enter__()


def test_costs_are_summed_exactly_and_kept_apart_by_currency(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    writer = UsageWriter(engine, flush_seconds=0.05)
    writer.open()
    usd = PriceSettings(currency="USD", prompt="0.1", completion="0.7")  # type: ignore[arg-type]
    eur = PriceSettings(currency="EUR", prompt="2")  # type: ignore[arg-type]
    for i in range(1000):
        r = UsageRecord(f"r{i}", "chat", team="t", prompt_tokens=1_000_000, completion_tokens=3)
        r.price(usd)  # 100000 + 2.1 -> 100002 micro-units each
        writer.add(r)
    r = UsageRecord("e", "chat", team="t", prompt_tokens=500_000)
    r.price(eur)
    writer.add(r)
    writer.close()
    with engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(usage.c.cost_micros).where(usage.c.request_id == "r0")
            ).scalar_one()
            == 100002
        )
    rows = summarize(engine, "team")
    by_currency = {r["currency"]: r for r in rows}
    assert by_currency["USD"]["cost"] == "100.002000"  # 1000 x 0.100002, no float drift
    assert by_currency["EUR"]["cost"] == "1.000000" and by_currency["EUR"]["requests"] == 1
    assert json.loads(render(rows, "json"))[0]["cost"] in ("1.000000", "100.002000")
    engine.dispose()


def test_migration_converts_existing_money(db_url: str) -> None:
    """Usage costs written as floats become micro-units; key budgets exact decimal strings
    of the amount the counters enforced (floor to the micro-unit); and back."""
    engine = make_engine(db_url)
    cfg = alembic_config(db_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO usage (request_id, ts, endpoint, stream, prompt_tokens, "
                "cached_tokens, completion_tokens, cost, currency, status, outcome, latency_ms, "
                "tokens_estimated) VALUES ('old', :ts, 'chat', false, 1, 0, 1, 0.1234567, 'USD', "
                "200, 'ok', 1.0, false)"
            ),
            {"ts": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, key_hash, prefix, name, team, limits, role, source, "
                "created_at, updated_at) VALUES ('k1', 'h', 'p', '', 't', :limits, 'member', "
                "'admin', :ts, :ts)"
            ),
            {"ts": now, "limits": json.dumps({"rpm": 3, "budget_day": 0.1 + 0.2})},
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT cost_micros FROM usage")).scalar_one() == 123457
        limits = conn.execute(sa.text("SELECT limits FROM api_keys")).scalar_one()
    limits = json.loads(limits) if isinstance(limits, str) else limits
    assert limits == {"rpm": 3, "budget_day": "0.300000"}
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT cost FROM usage")).scalar_one() == pytest.approx(
            0.123457
        )
    engine.dispose()
