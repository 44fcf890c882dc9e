"""At run time: a caller with a budget (set in the file or later through the admin API) is
never served a model its budget cannot count, and a budget counts only its own currency."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.identity.keys import create_key
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

ADMIN = {"Authorization": "Bearer admin-key-for-tests-0123456789"}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def _app(stub: StubEngine, tmp: Path) -> TestClient:
    deployment = {"deployments": [{"url": stub.url, "served_name": "stub-served"}]}
    budget = {"budget_day": "0.05"}
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/m.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN["Authorization"].split()[1]},
            "audit": audit_config(tmp),
            "cost_centers": {"cc": {}},
            "teams": {
                "t": {"cost_center": "cc"},
                "spender": {"cost_center": "cc", "models": ["stub"], "limits": budget},
                "spender2": {"cost_center": "cc", "models": ["stub"], "limits": budget},
            },
            "models": {"stub": deployment, "free": deployment, "euro": deployment},
            "prices": {
                "stub": {"prompt": "1000", "completion": "1000"},
                "euro": {"currency": "EUR", "prompt": "1000"},
            },
        }
    )
    return TestClient(build_app(settings))


def _key(c: TestClient, team: str) -> tuple[str, dict[str, str]]:
    rec, token = create_key(c.app.state.db, team=team, known_models={"stub", "free", "euro"})  # type: ignore[attr-defined]
    return rec.id, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _chat(c: TestClient, h: dict[str, str], model: str) -> tuple[int, dict[str, object]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    r = c.post("/v1/chat/completions", content=orjson.dumps(body), headers=h)
    return r.status_code, r.json()


def test_budget_set_through_the_api_refuses_models_it_cannot_count(
    stub: StubEngine, tmp_path: Path
) -> None:
    with _app(stub, tmp_path) as c:
        key_id, h = _key(c, "t")
        assert _chat(c, h, "free")[0] == 200  # no budget: an unpriced model is fine
        r = c.put(f"/admin/keys/{key_id}/limits", json={"budget_day": "1.25"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["limits"] == {"budget_day": "1.25"}
        before = len(stub.requests)
        status, body = _chat(c, h, "free")
        assert status == 403 and body["error"]["code"] == "model_not_priced"
        assert "'free' has no price" in body["error"]["message"]
        assert f"USD budget of key '{key_id}'" in body["error"]["message"]
        status, body = _chat(c, h, "euro")
        assert status == 403 and "is priced in EUR" in body["error"]["message"]
        assert len(stub.requests) == before  # nothing was forwarded
        assert _chat(c, h, "stub")[0] == 200
        # The same key with a budget kept in EUR: the EUR model only.
        r = c.put(
            f"/admin/keys/{key_id}/limits",
            json={"budget_day": "1", "currency": "EUR"},
            headers=ADMIN,
        )
        assert r.status_code == 200
        assert _chat(c, h, "euro")[0] == 200
        assert _chat(c, h, "stub")[0] == 403
        # An amount that is not a whole number of micro-units is refused, not rounded.
        bad = c.put(f"/admin/keys/{key_id}/limits", json={"budget_day": 0.1 + 0.2}, headers=ADMIN)
        assert bad.status_code == 400


def test_budget_counts_only_its_own_currency(stub: StubEngine, tmp_path: Path) -> None:
    with _app(stub, tmp_path) as c:
        writer = UsageWriter(c.app.state.db, 0.05)  # type: ignore[attr-defined]
        writer.open()
        for team, price in (
            ("spender", PriceSettings(currency="EUR", prompt=1000)),  # type: ignore[arg-type]
            ("spender2", PriceSettings(currency="USD", prompt=1000)),  # type: ignore[arg-type]
        ):
            rec = UsageRecord(f"earlier-{team}", "chat", team=team, prompt_tokens=50)
            rec.price(price)  # 0.05 of the currency: the whole USD budget, were it USD
            writer.add(rec)
        writer.close()
        # Both budgets are seeded from the records: EUR spend does not use up a USD budget.
        assert _chat(c, _key(c, "spender")[1], "stub")[0] == 200
        status, body = _chat(c, _key(c, "spender2")[1], "stub")
        assert status == 429 and body["error"]["code"] == "budget_exceeded"
        assert "0.050000 of 0.050000 USD" in body["error"]["message"]
