"""Two gateway replicas sharing the machine's Redis and one PostgreSQL database, in front of
the real vLLM engine: limits hold across replicas under 50+ concurrent requests."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import sqlalchemy as sa

from bastion.store.schema import usage
from tests.conftest import REDIS_URL, TINY, base_config

pytestmark = [pytest.mark.engine, pytest.mark.postgres]
PRICE = {"prompt": 100.0, "completion": 400.0}  # per 1M tokens


def _wait_for_fresh_minute() -> None:
    """Keeps a burst inside one calendar minute, so the tpm check below can count its records
    by minute (the windows themselves slide: any 60 s holds at most the limit)."""
    while time.time() % 60 > 35:
        time.sleep(0.5)


@pytest.fixture(scope="module")
def replicas(make_gateway, chat_engine, pg_url):  # type: ignore[no-untyped-def]
    tag = secrets.token_hex(3)
    teams = {
        "rpm": f"rpm-{tag}",
        "tpm": f"tpm-{tag}",
        "budget": f"budget-{tag}",
    }
    cfg = base_config(
        pg_url,
        {"tiny": {"deployments": [{"url": chat_engine.url, "served_name": TINY}]}},
        limits={"backend": "redis", "redis_url": REDIS_URL},
        prices={"tiny": PRICE},
    )
    cfg["teams"].update(
        {
            teams["rpm"]: {"cost_center": "cc-1", "limits": {"rpm": 20}},
            teams["tpm"]: {"cost_center": "cc-1", "limits": {"tpm": 1500}},
            teams["budget"]: {"cost_center": "cc-1", "limits": {"budget_day": 0.05}},
        }
    )
    a = make_gateway(cfg)
    b = make_gateway(cfg)
    return a, b, teams, pg_url


def _burst(gws, key: str, n: int, max_tokens: int = 8) -> list[object]:  # type: ignore[no-untyped-def]
    clients = [
        openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=120) for g in gws
    ]

    def one(i: int) -> object:
        try:
            return clients[i % 2].chat.completions.create(
                model="tiny",
                max_tokens=max_tokens,
                user=f"burst-{i}",
                messages=[{"role": "user", "content": f"Request number {i}, please."}],
            )
        except openai.RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=n) as pool:
        out = list(pool.map(one, range(n)))
    for c in clients:
        c.close()
    return out


def _rows(db_url: str, team: str) -> list[sa.Row]:  # type: ignore[type-arg]
    time.sleep(0.5)  # the usage writer's batch interval
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage).where(usage.c.team == team)).all()
    engine.dispose()
    return rows


def test_rpm_exact_across_replicas(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, teams, _db = replicas
    key = a.create_key(teams["rpm"])
    _wait_for_fresh_minute()
    results = _burst([a, b], key, 60)
    ok = [r for r in results if not isinstance(r, Exception)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) == 20 and len(limited) == 40  # exactly the limit, 0 % overshoot
    err = limited[0]
    assert err.response.headers["x-ratelimit-limit-requests"] == "20"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(err.response.headers["retry-after"]) >= 1
    # Both replicas now refuse the key.
    for g in (a, b):
        with (
            openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0) as c,
            pytest.raises(openai.RateLimitError),
        ):
            c.chat.completions.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )


def test_tpm_never_exceeded(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, teams, db = replicas
    key = a.create_key(teams["tpm"])
    _wait_for_fresh_minute()
    window = int(time.time() // 60)
    results = _burst([a, b], key, 60, max_tokens=16)
    assert any(isinstance(r, openai.RateLimitError) for r in results)
    rows = [
        r
        for r in _rows(db, teams["tpm"])
        if r.outcome == "ok" and int(r.ts.timestamp() // 60) == window
    ]
    used = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert 0 < used <= 1500 * 1.01


def test_budget_overshoot_at_most_one_request(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, teams, db = replicas
    key = a.create_key(teams["budget"])
    results = _burst([a, b], key, 60, max_tokens=16)
    codes = Counter(getattr(r, "code", "ok") for r in results)
    assert codes["budget_exceeded"] > 0 and codes["ok"] > 0
    rows = [r for r in _rows(db, teams["budget"]) if r.outcome == "ok"]
    spent = sum(r.cost_micros for r in rows)  # exact integer micro-units
    # One request costs at most: prompt upper bound (~40 tokens) + 16 completion tokens.
    max_one = 60 * PRICE["prompt"] + 16 * PRICE["completion"]
    assert spent <= 50_000 + max_one
