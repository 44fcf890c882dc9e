"""Tiers end to end: a real vLLM engine serves `pro` (and `lite`); `flash` points at a port
nobody listens on; stub engines inject 429, 503, a late first event and a stream that breaks
after its first event. Called with the official `openai` SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest

from bastion.local.launcher import VllmProcess, free_port
from tests.audit_api import entries_of
from tests.conftest import TINY, Gateway, base_config, usage_rows
from tests.stub_engine import StubEngine

pytestmark = pytest.mark.engine
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    made = {m: StubEngine().start() for m in ("429", "503", "late-first-event", "drop-stream")}
    made["spare"] = StubEngine().start()
    for mode, stub in made.items():
        stub.mode = mode if mode != "spare" else "ok"
    yield made
    for stub in made.values():
        stub.stop()


@pytest.fixture(scope="module")
def tiers(
    make_gateway: Any,
    chat_engine: VllmProcess,
    stubs: dict[str, StubEngine],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Gateway, str]:
    db = f"sqlite:///{tmp_path_factory.mktemp('tiers')}/t.db"
    real = {"deployments": [{"url": chat_engine.url, "served_name": TINY}]}

    def stub(mode: str, **extra: Any) -> dict[str, Any]:
        dep = {"url": stubs[mode].url, "served_name": "stub"}
        return {"deployments": [dep], "fallbacks": ["pro"], **extra}

    models = {
        "pro": real,
        "lite": real,
        # Nothing listens there: every connection is refused.
        "flash": {
            "deployments": [{"url": f"http://127.0.0.1:{free_port()}", "served_name": TINY}],
            "fallbacks": ["pro"],
        },
        "busy": stub("429"),
        "gone": stub("503"),
        "late": stub("late-first-event", routing={"first_byte_timeout_s": 1.0}),
        "broken": {
            "deployments": [{"url": stubs["drop-stream"].url, "served_name": "stub"}],
            "fallbacks": ["spare"],
        },
        "spare": {"deployments": [{"url": stubs["spare"].url, "served_name": "stub"}]},
        "closed": stub("503"),
    }
    models["closed"]["fallbacks"] = ["lite"]  # a key below may not use lite
    rules = [
        {"name": "long", "prompt_tokens_over": 2000, "target": "pro"},
        {"name": "agent", "tools": True, "target": "pro"},
        {"name": "think", "reasoning_effort": ["high"], "target": "pro"},
        {"name": "asked", "header": {"name": "x-tier", "equals": "pro"}, "target": "pro"},
        {"name": "risk", "teams": ["beta"], "target": "pro"},
    ]
    prices = {"pro": {"prompt": "2.00", "completion": "4.00"}}
    gw = make_gateway(
        base_config(
            db,
            models,
            routers={"auto": {"rules": rules, "default": "lite"}},
            prices=prices,
        )
    )
    # /readyz stays 503 (flash never has a healthy deployment): wait for the real engine.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = httpx.get(gw.url + "/readyz").json()
        if body["models"]["pro"]["ready"] and body["models"]["busy"]["ready"]:
            break
        time.sleep(0.2)
    return gw, db


def _client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def _show(gw: Gateway, auditor: str, rid: str) -> list[dict[str, Any]]:
    return entries_of(gw.url, auditor, rid)


def test_a_down_alias_falls_back_and_says_who_served(tiers: tuple[Gateway, str]) -> None:
    gw, db = tiers
    key = gw.create_key("alpha")
    with _client(gw, key) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="flash", messages=HI, max_tokens=3, user="fb-whole"
        )
        answer = raw.parse()
        assert answer.choices[0].message.content is not None
        assert answer.model == "flash"  # the name the client called
        assert raw.headers["x-bastion-routed-to"] == "pro[0]"
        assert raw.headers["x-bastion-fallback-from"] == "flash; reason=unavailable"
        rid = raw.headers["x-request-id"]
        streamed = c.chat.completions.with_raw_response.create(
            model="flash", messages=HI, max_tokens=3, stream=True, user="fb-stream"
        )
        assert streamed.headers["x-bastion-routed-to"] == "pro[0]"
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed.parse() if ch.choices)
    (row,) = usage_rows(db, client_user="fb-whole")
    assert (row.model, row.served_model, row.deployment) == ("flash", "pro", "pro[0]")
    assert row.status == 200 and row.cost_micros > 0  # charged at pro's price
    (row,) = usage_rows(db, client_user="fb-stream")
    assert (row.model, row.served_model, row.stream) == ("flash", "pro", True)
    _req, done = _show(gw, gw.create_auditor_key("alpha"), rid)
    assert done["kind"] == "completion" and done["outcome"] == "ok"
    assert (done["model"], done["served_model"], done["deployment"]) == ("flash", "pro", "pro[0]")
    metrics = httpx.get(gw.url + "/metrics").text
    (line,) = [ln for ln in metrics.splitlines() if ln.startswith("bastion_fallbacks_total{")]
    for label in ('from="flash"', 'to="pro"', 'reason="unavailable"'):
        assert label in line, line


@pytest.mark.parametrize(("alias", "reason"), [("busy", "overloaded"), ("gone", "unavailable")])
def test_429_and_503_fall_back(tiers: tuple[Gateway, str], alias: str, reason: str) -> None:
    gw, _db = tiers
    with _client(gw, gw.create_key("alpha")) as c:
        raw = c.chat.completions.with_raw_response.create(model=alias, messages=HI, max_tokens=2)
        assert raw.headers["x-bastion-routed-to"] == "pro[0]"
        assert raw.headers["x-bastion-fallback-from"] == f"{alias}; reason={reason}"


def test_no_first_byte_in_time_falls_back(
    tiers: tuple[Gateway, str], stubs: dict[str, StubEngine]
) -> None:
    gw, _db = tiers
    asked = len(stubs["late-first-event"].requests)
    with _client(gw, gw.create_key("alpha")) as c:
        t0 = time.monotonic()
        raw = c.chat.completions.with_raw_response.create(
            model="late", messages=HI, max_tokens=2, stream=True
        )
        assert raw.headers["x-bastion-routed-to"] == "pro[0]"
        assert raw.headers["x-bastion-fallback-from"] == "late; reason=first_byte_timeout"
        assert list(raw.parse())
        assert time.monotonic() - t0 < 4.5  # not the stub's 5 s
    assert len(stubs["late-first-event"].requests) == asked + 1


def test_never_after_the_first_byte(
    tiers: tuple[Gateway, str], stubs: dict[str, StubEngine]
) -> None:
    gw, db = tiers
    spare = len(stubs["spare"].requests)
    chunks: list[Any] = []
    with _client(gw, gw.create_key("alpha")) as c:
        with pytest.raises(openai.APIError):  # the stream ends in an error event
            with c.chat.completions.create(
                model="broken", messages=HI, max_tokens=2, stream=True, user="broken"
            ) as s:
                for ch in s:
                    chunks.append(ch)
        assert chunks[0].choices[0].delta.content == "a"  # the client had the first byte
    assert len(stubs["spare"].requests) == spare  # and nothing went to the fallback
    (row,) = usage_rows(db, client_user="broken")
    assert row.served_model == "broken" and row.outcome != "ok"


def test_a_fallback_the_key_may_not_use_is_skipped(tiers: tuple[Gateway, str]) -> None:
    gw, _db = tiers
    with _client(gw, gw.create_key("alpha", "--models", "closed,pro")) as c:
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="closed", messages=HI, max_tokens=2)
        assert info.value.status_code == 503  # the 503 of `closed` itself, not lite's answer


def test_router_rules_with_the_sdk(tiers: tuple[Gateway, str]) -> None:
    gw, _db = tiers
    alpha, beta = gw.create_key("alpha"), gw.create_key("beta")

    def routed(key: str = alpha, **kw: Any) -> tuple[str, str]:
        with _client(gw, key) as c:
            raw = c.chat.completions.with_raw_response.create(
                model="auto", max_tokens=2, **{"messages": HI, **kw}
            )
            assert raw.parse().model == "auto"
            return raw.headers["x-bastion-router"], raw.headers["x-bastion-routed-to"]

    assert routed() == ("auto; rule=default; target=lite", "lite[0]")
    assert routed(tools=[TOOL]) == ("auto; rule=agent; target=pro", "pro[0]")
    assert routed(reasoning_effort="high")[0] == "auto; rule=think; target=pro"
    assert routed(extra_headers={"x-tier": "pro"})[0] == "auto; rule=asked; target=pro"
    assert routed(beta)[0] == "auto; rule=risk; target=pro"
    long = [{"role": "user", "content": "word " * 500}]  # 2500 bytes: over 2000 (upper bound)
    assert routed(messages=long)[0] == "auto; rule=long; target=pro"
    with _client(gw, alpha) as c:
        assert "auto" in [m.id for m in c.models.list()]
    metrics = httpx.get(gw.url + "/metrics").text
    lines = [ln for ln in metrics.splitlines() if ln.startswith("bastion_router_decisions_total{")]
    assert any('rule="agent"' in ln and 'target="pro"' in ln for ln in lines), lines


def test_every_wire_api_says_who_served(tiers: tuple[Gateway, str]) -> None:
    """Anthropic Messages and the Responses API fall back and say so like chat completions."""
    gw, db = tiers
    key = gw.create_key("alpha")
    with anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0) as a:
        raw = a.messages.with_raw_response.create(
            model="flash", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().content is not None
        assert raw.headers["x-bastion-routed-to"] == "pro[0]"
        assert raw.headers["x-bastion-fallback-from"] == "flash; reason=unavailable"
        with a.messages.with_streaming_response.create(
            model="flash", max_tokens=3, stream=True, messages=[{"role": "user", "content": "hi"}]
        ) as streamed:
            assert streamed.headers["x-bastion-routed-to"] == "pro[0]"
            assert "message_stop" in "".join(streamed.iter_lines())
    with _client(gw, key) as c:
        raw = c.responses.with_raw_response.create(
            model="flash", input="hi", max_output_tokens=16, store=False, user="fb-responses"
        )
        assert raw.parse().status in ("completed", "incomplete")
        assert raw.headers["x-bastion-routed-to"] == "pro[0]"
    (row,) = usage_rows(db, client_user="fb-responses")
    assert (row.endpoint, row.model, row.served_model) == ("responses", "flash", "pro")


def test_a_queue_timeout_falls_back(make_gateway: Any, chat_engine: VllmProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bastion's own queue for a saturated alias gives up: the next alias serves instead."""
    slow = StubEngine().start()
    slow.delay = 3.0
    try:
        models = {
            "flash": {
                "deployments": [{"url": slow.url, "served_name": "stub", "max_concurrency": 1}],
                "fallbacks": ["pro"],
            },
            "pro": {"deployments": [{"url": chat_engine.url, "served_name": TINY}]},
        }
        db = f"sqlite:///{tmp_path}/q.db"
        gw = make_gateway(base_config(db, models, limits={"queue_timeout_seconds": 0.5}))
        gw.wait_ready()
        key = gw.create_key("alpha")
        with _client(gw, key) as c, ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                c.chat.completions.with_raw_response.create,
                model="flash",
                messages=HI,
                max_tokens=2,
                user="q-holder",
            )
            time.sleep(0.5)  # the holder has flash's only slot; the next one queues, then moves
            raw = c.chat.completions.with_raw_response.create(
                model="flash", messages=HI, max_tokens=2, user="q-moved"
            )
            assert raw.headers["x-bastion-routed-to"] == "pro[0]"
            assert raw.headers["x-bastion-fallback-from"] == "flash; reason=queue_timeout"
            assert first.result().headers["x-bastion-routed-to"] == "flash[0]"
        (row,) = usage_rows(db, client_user="q-moved")
        assert (row.model, row.served_model, row.status) == ("flash", "pro", 200)
    finally:
        slow.stop()
