"""Limits, budgets and caps in one gateway process (in-memory counters), engine stubbed for
speed; the same paths run against real vLLM across two replicas in test_limits_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.core.settings import LimitSettings
from bastion.identity.keys import create_key
from tests.conftest import RedisServer, audit_config
from tests.stub_engine import StubEngine

ADMIN = "admin-key-for-tests-0123456789"


def chat(**extra: object) -> bytes:
    return orjson.dumps(
        {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    )


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def make_app(stub: StubEngine, tmp: Path, **limits: object) -> TestClient:
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/l.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN},
            "audit": audit_config(tmp),
            "limits": limits,
            "cost_centers": {"cc": {}, "cc-rich": {"limits": {"budget_month": 1000}}},
            "teams": {
                "t": {"cost_center": "cc", "limits": {"rpm": 3}},
                "spender": {"cost_center": "cc", "limits": {"budget_day": 0.05}},
                "bulk": {"cost_center": "cc-rich", "model_limits": {"stub": {"tpm": 40}}},
            },
            "models": {
                "stub": {
                    "max_tokens": 50,
                    "deployments": [{"url": stub.url, "served_name": "stub-served"}],
                }
            },
            "prices": {"stub": {"prompt": 1000, "completion": 1000}},
        }
    )
    return TestClient(build_app(settings))


def key(c: TestClient, team: str, limits: LimitSettings | None = None) -> dict[str, str]:
    db = c.app.state.db  # type: ignore[attr-defined]
    _rec, token = create_key(db, team=team, known_models={"stub"}, limits=limits)
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_rpm_headers_and_429(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path) as c:
        h = key(c, "t")
        seen = []
        for _ in range(3):
            r = c.post("/v1/chat/completions", content=chat(), headers=h)
            assert r.status_code == 200
            seen.append(r.headers["x-ratelimit-remaining-requests"])
            assert r.headers["x-ratelimit-limit-requests"] == "3"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert seen == ["2", "1", "0"]
        r = c.post("/v1/chat/completions", content=chat(), headers=h)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "team 't'" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # A different team is not affected.
        assert (
            c.post("/v1/chat/completions", content=chat(), headers=key(c, "bulk")).status_code
            == 200
        )


def test_key_override_and_every_level_applies(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path) as c:
        h = key(c, "t", LimitSettings(rpm=1))
        assert c.post("/v1/chat/completions", content=chat(), headers=h).status_code == 200
        r = c.post("/v1/chat/completions", content=chat(), headers=h)
        assert r.status_code == 429 and "key '" in r.json()["error"]["message"]
        # The team's rpm (3) still counts this key's request.
        other = key(c, "t")
        codes = [
            c.post("/v1/chat/completions", content=chat(), headers=other).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]


def test_tpm_reserves_then_settles(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path) as c:
        h = key(c, "bulk")
        # Reserve: 'hi' (2 bytes) + 8 per message + 8 per chat + max_tokens 5 = 23; the stub
        # then reports 6 used.
        r = c.post("/v1/chat/completions", content=chat(), headers=h)
        assert r.headers["x-ratelimit-limit-tokens"] == "40"
        assert r.headers["x-ratelimit-remaining-tokens"] == "17"
        too_big = c.post("/v1/chat/completions", content=chat(max_tokens=40), headers=h)
        assert (
            too_big.status_code == 429 and "tokens per minute" in too_big.json()["error"]["message"]
        )
        status = c.get(
            "/admin/limits", params={"team": "bulk"}, headers={"Authorization": f"Bearer {ADMIN}"}
        ).json()
        tpm = next(s for s in status if s["limit_kind"] == "tpm")
        assert tpm["used"] == 6  # the reservation was replaced by the actual usage


def test_best_of_is_reserved_like_n(stub: StubEngine, tmp_path: Path) -> None:
    """best_of sequences are generated, then all but n discarded: each is reserved, so best_of
    cannot multiply what a token limit lets through (issue 10, item 2)."""
    with make_app(stub, tmp_path) as c:
        h = key(c, "bulk")
        # 18 for the prompt (as above) and 3 sequences of at most 5 tokens: 33 of 40.
        r = c.post("/v1/chat/completions", content=chat(best_of=3, n=2), headers=h)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-tokens"] == "7"
        # Settled to the stub's 6: 6 + 18 + 3 x 8 = 48 is over 40; one sequence of 8 fits.
        over = c.post("/v1/chat/completions", content=chat(best_of=3, max_tokens=8), headers=h)
        assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
        assert c.post("/v1/chat/completions", content=chat(max_tokens=8), headers=h).is_success


def test_budget_exhausts_without_overshoot(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path) as c:
        h = key(c, "spender")
        codes = []
        for _ in range(12):
            r = c.post("/v1/chat/completions", content=chat(), headers=h)
            codes.append(r.status_code)
            if r.status_code == 429:
                break
        assert codes[-1] == 429 and codes.count(200) >= 4
        err = r.json()["error"]
        assert (
            err["code"] == "budget_exceeded" and "daily budget of team 'spender'" in err["message"]
        )
        assert r.headers["x-should-retry"] == "false"
        status = c.get(
            "/admin/limits",
            params={"team": "spender"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).json()
        budget = next(s for s in status if s["limit_kind"] == "budget_day")
        # Exact decimal strings, in the budget's currency.
        assert budget["limit"] == "0.050000" and budget["currency"] == "USD"
        assert Decimal(budget["used"]) <= Decimal(budget["limit"])


def test_budget_is_seeded_from_usage_records(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path) as c:
        h = key(c, "spender")
        while c.post("/v1/chat/completions", content=chat(), headers=h).status_code == 200:
            pass
    # A restart (fresh in-memory counters) must not hand out a fresh budget: the spend so far
    # is read back from the usage records.
    with make_app(stub, tmp_path) as c:
        r = c.post("/v1/chat/completions", content=chat(), headers=key(c, "spender"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"


def test_caps(stub: StubEngine, tmp_path: Path) -> None:
    with make_app(stub, tmp_path, max_messages=2, max_n=2) as c:
        h = key(c, "bulk")
        msgs = [{"role": "user", "content": "x"}] * 3
        cases = [
            (chat(messages=msgs), "messages"),
            (chat(n=3), "n"),
            (chat(max_tokens=51), "max_tokens"),
            (chat(max_completion_tokens=99), "max_completion_tokens"),
        ]
        for body, param in cases:
            r = c.post("/v1/chat/completions", content=body, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        # No max_tokens: the model's default cap (within its ceiling) is sent to the engine.
        bare = orjson.dumps({"model": "stub", "messages": [{"role": "user", "content": "x"}]})
        r = c.post("/v1/chat/completions", content=bare, headers=key(c, "t"))
        assert r.status_code == 200, r.text
        assert stub.requests[-1]["max_tokens"] == 50


@pytest.mark.parametrize("mode", ["closed", "local"])
def test_redis_down(stub: StubEngine, tmp_path: Path, mode: str) -> None:
    redis_server = RedisServer(tmp_path).start()
    try:
        with make_app(
            stub, tmp_path, backend="redis", redis_url=redis_server.url, on_backend_failure=mode
        ) as c:
            h = key(c, "t")
            assert c.post("/v1/chat/completions", content=chat(), headers=h).status_code == 200
            redis_server.stop()
            r = c.post("/v1/chat/completions", content=chat(), headers=h)
            metrics = c.get("/metrics").text
            assert "bastion_limits_backend_failures_total 1.0" in metrics
            if mode == "closed":
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "limits_unavailable"
            else:
                assert r.status_code == 200  # local counters: rpm 3 per replica from now on
                codes = [
                    c.post("/v1/chat/completions", content=chat(), headers=h).status_code
                    for _ in range(3)
                ]
                assert codes == [200, 200, 429]
    finally:
        redis_server.stop()


def test_fail_closed_forwards_nothing(stub: StubEngine, tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path).start()
    with make_app(stub, tmp_path, backend="redis", redis_url=redis_server.url) as c:
        h = key(c, "t")
        redis_server.stop()
        before = len(stub.requests)
        assert c.post("/v1/chat/completions", content=chat(), headers=h).status_code == 503
        assert len(stub.requests) == before
