"""Prefix-affinity routing in front of two real vLLM replicas with a small KV cache, and (for
the one load assertion the real engine answers too fast for) two slow stub upstreams."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from bastion.local.launcher import VllmProcess
from tests.conftest import TINY, Gateway, base_config, usage_rows
from tests.routing.conftest import Replica
from tests.stub_engine import StubEngine
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def replicas(replica_pair: list[Replica]) -> list[VllmProcess]:
    """The session's pair (tests/routing/conftest.py), shared with the precise module: its
    small KV cache (80 blocks of 32 tokens) fills with a few long prefixes, as a busy production
    cache would; its KV-event publishing is idle here (no gateway subscribes)."""
    return [r.proc for r in replica_pair]


@pytest.fixture(scope="module")
def pair(
    make_gateway: Callable[..., Gateway],
    replicas: list[VllmProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Gateway, str, str]:
    db = f"sqlite:///{tmp_path_factory.mktemp('aff')}/a.db"
    deps = [{"url": p.url, "served_name": TINY} for p in replicas]
    gw = make_gateway(base_config(db, {"pair": {"deployments": deps}}))
    gw.wait_ready()
    return gw, gw.create_key("alpha"), db


def _ask(c: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> tuple[str, str]:
    """One call; its request id and the answer's text."""
    raw = c.chat.completions.with_raw_response.create(
        model="pair", max_tokens=8, temperature=0, messages=messages, **kw
    )
    return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""


def _row(db: str, request_id: str) -> Any:
    rows = usage_rows(db, request_id=request_id)
    assert rows, request_id
    return rows[0]


def _metrics(gw: Gateway) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, ...], float] = {}
    for m in re.finditer(r"^(bastion_\w+)_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
        out[(m.group(1), *(f"{k}={v}" for k, v in labels))] = float(m.group(3))
    return out


def _system(topic: str) -> dict[str, str]:
    return {
        "role": "system",
        "content": f"You assist the {topic} desk of the bank. "
        + " ".join(f"Rule {i}: answer {topic} questions precisely." for i in range(40)),
    }


def test_conversations_stay_on_one_replica_and_hit_the_cache(pair) -> None:  # type: ignore[no-untyped-def]
    gw, key, db = pair
    placed: dict[str, set[str]] = {}
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        # Ten conversations: the ring (hashed from the replicas' URLs, random ports here)
        # leaves all ten on one replica with probability 2/1024.
        for topic in [f"topic-{i}" for i in range(10)]:
            messages: list[dict[str, Any]] = [_system(topic)]
            rows = []
            for turn in range(3):  # a growing conversation, no session hint at all
                messages.append({"role": "user", "content": f"Question {turn} about {topic}?"})
                rid, text = _ask(c, messages)
                messages.append({"role": "assistant", "content": text})
                rows.append(_row(db, rid))
            placed[topic] = {r.deployment for r in rows}
            # Later turns read the shared prefix from the replica's cache.
            assert all(r.cached_tokens > 0 for r in rows[1:]), [r.cached_tokens for r in rows]
    assert all(len(d) == 1 for d in placed.values()), placed
    # Different conversations do not all pile on one replica.
    assert {d for s in placed.values() for d in s} == {"pair[0]", "pair[1]"}, placed
    m = _metrics(gw)
    prefix = sum(
        v for k, v in m.items() if k[0] == "bastion_routing_decisions" and "reason=prefix" in k
    )
    assert prefix >= 10 * 2  # every later turn was routed by its learned prefix


def test_session_hints_keep_requests_together(pair) -> None:  # type: ignore[no-untyped-def]
    gw, key, db = pair
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        where: dict[str, set[str]] = {}
        for s in range(6):
            for i in range(3):
                # Different prompts each time: only the hint ties them together.
                msgs = [{"role": "user", "content": f"unrelated question {i} " * (i + 1)}]
                extra = {"prompt_cache_key": f"codex-{s}"} if s % 2 else {"user": f"u-{s}"}
                rid, _ = _ask(c, msgs, **extra)
                where.setdefault(f"s{s}", set()).add(_row(db, rid).deployment)
        rid, _ = _ask(
            c,
            [{"role": "user", "content": "via header"}],
            extra_headers={"x-session-affinity": "codex-1"},
        )
        assert {_row(db, rid).deployment} == where["s1"]
    assert all(len(v) == 1 for v in where.values()), where
    m = _metrics(gw)
    assert sum(v for k, v in m.items() if "reason=session" in k) >= 19


def _routing_status(gw: Gateway) -> dict[str, dict[str, Any]]:
    out = gw.cli("routing", "status", "--url", gw.url, "--format", "json").stdout
    return {r["deployment"]: r for r in json.loads(out)}


def test_an_unreachable_replicas_groups_move_and_come_back(  # type: ignore[no-untyped-def]
    make_gateway, replicas, tmp_path: Path
) -> None:
    """Replica 1 sits behind a proxy that goes down (refused connections: a crash or a
    partition) and comes back; its groups move to replica 0 and return after slow-start."""
    proxy = TcpProxy(replicas[1].spec.port).up()
    try:
        db = f"sqlite:///{tmp_path}/m.db"
        deps = [
            {"url": replicas[0].url, "served_name": TINY},
            {"url": proxy.url, "served_name": TINY},
        ]
        routing = {"slow_start_s": 3}
        gw = make_gateway(base_config(db, {"pair": {"deployments": deps, "routing": routing}}))
        gw.wait_ready()
        key = gw.create_key("alpha")
        topics = [f"desk-{i}" for i in range(16)]
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:

            def ask(topic: str, question: str) -> Any:
                return _row(db, _ask(c, [_system(topic), {"role": "user", "content": question}])[0])

            homes = {t: ask(t, "hi").deployment for t in topics}
            # The ring leaves all 16 groups on one replica with probability 2 / 65536.
            assert set(homes.values()) == {"pair[0]", "pair[1]"}, homes
            moved = [t for t in topics if homes[t] == "pair[1]"]
            proxy.down()
            for t in moved:  # each group twice: it moves, and is then cached where it went
                rows = [ask(t, f"again {i}") for i in range(2)]
                assert {r.deployment for r in rows} == {"pair[0]"}, t
                assert rows[1].cached_tokens > 0, (t, rows[1].cached_tokens)
            assert not _routing_status(gw)["pair[1]"]["available"]
            proxy.up()
            deadline = time.monotonic() + 30  # the health check notices, then 3 s of slow-start
            while time.monotonic() < deadline:
                status = _routing_status(gw)["pair[1]"]
                if status["available"] and status["warmth"] == 1.0:
                    break
                time.sleep(0.5)
            assert status["available"] and status["warmth"] == 1.0, status
            for t in moved:  # every moved group returns home, and stays there
                rows = [ask(t, f"back {i}") for i in range(2)]
                assert {r.deployment for r in rows} == {"pair[1]"}, t
            for t in set(topics) - set(moved):  # the others never moved
                assert ask(t, "still here").deployment == "pair[0]"
    finally:
        proxy.down()
    m = _metrics(gw)
    assert m[("bastion_routing_decisions", "deployment=pair[1]", "reason=return")] == len(moved)
    assert m[("bastion_routing_retries", "model=pair", "outcome=retried")] >= 1
    prompt = m[("bastion_deployment_prompt_tokens", "deployment=pair[0]", "kind=prompt")]
    cached = m[("bastion_deployment_prompt_tokens", "deployment=pair[0]", "kind=cached")]
    assert 0 < cached < prompt
    # The same tallies, from the CLI that asks the running gateway.
    status = _routing_status(gw)
    assert status["pair[0]"]["cached_tokens"] == cached
    assert status["pair[0]"]["prompt_tokens"] == prompt
    assert status["pair[0]"]["mode"] == "affinity"
    assert status["pair[0]"]["decisions"].get("fallback-to-available", 0) >= 1
    assert status["pair[1]"]["decisions"]["return"] == len(moved)
    table = gw.cli("routing", "status", "--url", gw.url).stdout
    assert "pair[0]" in table and "prefix=" in table and "return=" in table


def test_a_hot_prefix_spills_over_at_the_bound(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real engine answers the tiny model faster than requests pile up; slow stubs hold
    requests in flight long enough to see the bound act."""
    stubs = [StubEngine().start() for _ in range(2)]
    try:
        for s in stubs:
            s.delay = 1.0
        db = f"sqlite:///{tmp_path}/s.db"
        deps = [{"url": s.url, "served_name": "stub"} for s in stubs]
        models = {
            "hot": {"deployments": deps},
            "unbounded": {"deployments": deps, "routing": {"load_factor": 100.0}},
        }
        gw = make_gateway(base_config(db, models))
        gw.wait_ready()
        key = gw.create_key("alpha")
        prompt = [_system("treasury"), {"role": "user", "content": "the same question"}]

        def burst(model: str) -> Counter[int]:
            for s in stubs:
                s.requests.clear()
            with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
                with ThreadPoolExecutor(8) as pool:
                    list(
                        pool.map(
                            lambda _: c.chat.completions.create(
                                model=model, max_tokens=2, messages=prompt
                            ),
                            range(8),
                        )
                    )
            return Counter({i: len(s.requests) for i, s in enumerate(stubs)})

        bounded = burst("hot")
        # 8 at once: the owner stops at ceil(1.25 * mean); the rest spill to the other.
        assert sum(bounded.values()) == 8 and max(bounded.values()) <= 5, bounded
        assert min(bounded.values()) >= 3, bounded
        unbounded = burst("unbounded")
        assert sorted(unbounded.values()) == [0, 8], unbounded  # the bound is what spread them
        m = _metrics(gw)
        assert sum(v for k, v in m.items() if "reason=spill" in k) >= 3
    finally:
        for s in stubs:
            s.stop()
