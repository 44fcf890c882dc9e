"""Precise routing in front of two real vLLM replicas that publish their KV-cache events, with a
small cache (80 blocks of 32 tokens) so that eviction is easy to cause."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import zmq

from bastion.engines.settings import DeploymentSettings, KvEventsSettings
from bastion.routing.balancer import Deployment
from bastion.routing.kv_events import (
    END_SEQ,
    BlockIndex,
    BlockRemoved,
    BlockStored,
    Subscriber,
    decode_batch,
)
from bastion.routing.precise import block_hashes, none_hash
from bastion.routing.prompt_tokens import PromptTokens
from tests.conftest import ADMIN_KEY, TINY, Gateway, base_config, usage_rows
from tests.routing.conftest import BLOCK, HASH_SEED, Replica

pytestmark = pytest.mark.engine

SEED = HASH_SEED


@pytest.fixture(scope="module")
def replicas(replica_pair: list[Replica]) -> list[Replica]:
    """The session's pair (tests/routing/conftest.py), shared with the affinity module."""
    return replica_pair


@pytest.fixture(scope="module")
def gateway(
    make_gateway: Callable[..., Gateway],
    replicas: list[Replica],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Gateway, str, str]:
    db = f"sqlite:///{tmp_path_factory.mktemp('precise')}/p.db"
    deps = [
        {
            "url": r.proc.url,
            "served_name": TINY,
            "kv_events": {"endpoint": r.events, "replay_endpoint": r.replay, "bind": r.bind},
        }
        for r in replicas
    ]
    model = {
        "deployments": deps,
        "tokenizer": str(tiny_model),
        "routing": {"mode": "precise", "precise": {"hash_seed": SEED}},
    }
    gw = make_gateway(base_config(db, {"pair": model}))
    gw.wait_ready()
    return gw, gw.create_key("alpha"), db


def _system(topic: str, rules: int = 12) -> dict[str, str]:
    return {
        "role": "system",
        "content": f"You assist the {topic} desk. "
        + " ".join(f"Rule {i}: {topic} answers cite policy {i}." for i in range(rules)),
    }


def _direct(replica: Replica, messages: list[dict[str, Any]]) -> None:
    """A request straight to one replica (not through Bastion): it caches the prompt there."""
    body = {"model": TINY, "messages": messages, "max_tokens": 1, "temperature": 0}
    req = urllib.request.Request(
        replica.proc.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def _batches(replica: Replica, start: int = 0) -> list[tuple[int, bytes]]:
    """Every batch the replica still buffers, from its replay socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(replica.replay)
    try:
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while sock.poll(5000):
            frames = sock.recv_multipart()
            if frames[2] == END_SEQ:
                return out
            out.append((int.from_bytes(frames[2], "big"), frames[3]))
        raise AssertionError("the replay socket did not finish")
    finally:
        sock.close()


def _events(replica: Replica) -> list[Any]:
    return [e for _, p in _batches(replica) for e in decode_batch(p).events]


def _hashes(tokens: PromptTokens, messages: list[dict[str, Any]]) -> list[int]:
    ids = tokens.of(SimpleNamespace(wire=SimpleNamespace(name="chat"), body={"messages": messages}))
    assert ids is not None
    return block_hashes(ids, BLOCK, none_hash(SEED))


def _tokenize(replica: Replica, body: dict[str, Any]) -> list[int]:
    req = urllib.request.Request(
        replica.proc.url + "/tokenize",
        data=json.dumps({"model": TINY, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["tokens"]


def _decisions(gw: Gateway) -> dict[str, dict[str, int]]:
    return {r["deployment"]: r["decisions"] for r in _routing(gw)}


def _routing(gw: Gateway) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        gw.url + "/admin/routing?model=pair", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _wait(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_local_tokens_and_hashes_equal_vllms(replicas: list[Replica], tiny_model: Path) -> None:
    tokens = PromptTokens(str(tiny_model))
    r = replicas[0]
    convo = [
        _system("hashing"),
        {"role": "user", "content": "What is rule 3?"},
        {"role": "assistant", "content": "Rule 3 cites policy 3."},
        {"role": "user", "content": [{"type": "text", "text": "And rule 4?"}]},
    ]
    body = {"messages": convo}
    mine = tokens.of(SimpleNamespace(wire=SimpleNamespace(name="chat"), body=body))
    assert mine == _tokenize(r, {**body, "add_generation_prompt": True})
    prompt = "Completions are tokenized whole. " * 12
    done = tokens.of(
        SimpleNamespace(wire=SimpleNamespace(name="completions"), body={"prompt": prompt})
    )
    assert done == _tokenize(r, {"prompt": prompt})

    _direct(r, convo)
    expected = _hashes(tokens, convo)
    assert len(expected) >= 5
    stored = [e for e in _events(r) if isinstance(e, BlockStored) and e.parent_block_hash is None]
    # vLLM's own events for this prompt carry exactly the hashes computed here.
    assert any(e.block_hashes[: len(expected)] == expected for e in stored), expected


def test_a_repeated_prompt_goes_where_its_blocks_are(gateway, replicas) -> None:  # type: ignore[no-untyped-def]
    gw, key, db = gateway
    topics = [f"desk-{i}" for i in range(4)]
    # Each prompt cached on a chosen replica, behind Bastion's back: only the events tell.
    for i, t in enumerate(topics):
        _direct(replicas[i % 2], [_system(t), {"role": "user", "content": "warm up"}])
    for i, r in enumerate(replicas):
        _synced(gw, r, i)
    before = _decisions(gw)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        for i, t in enumerate(topics):
            raw = c.chat.completions.with_raw_response.create(
                model="pair",
                max_tokens=4,
                temperature=0,
                messages=[_system(t), {"role": "user", "content": f"question {i}"}],
            )
            row = usage_rows(db, request_id=raw.headers["x-request-id"])[0]
            assert row.deployment == f"pair[{i % 2}]", (t, row.deployment)
            assert row.cached_tokens >= 5 * BLOCK, row.cached_tokens
    after = _decisions(gw)
    gained = sum(
        after[d].get("cached-prefix", 0) - before[d].get("cached-prefix", 0) for d in after
    )
    assert gained == len(topics)
    rows = {r["deployment"]: r for r in _routing(gw)}
    assert all(r["mode"] == "precise" and r["kv_events"] == "live" for r in rows.values())


def test_evicted_blocks_stop_attracting_requests(gateway, replicas, tiny_model) -> None:  # type: ignore[no-untyped-def]
    gw, key, _ = gateway
    tokens = PromptTokens(str(tiny_model))
    target = [_system("eviction", rules=20), {"role": "user", "content": "first"}]
    first = _hashes(tokens, target)[0]
    _direct(replicas[0], target)
    _synced(gw, replicas[0], 0)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:

        def ask() -> None:
            c.chat.completions.create(model="pair", max_tokens=2, messages=target)

        before = _cached_prefix(gw)
        ask()
        assert _decisions(gw)["pair[0]"].get("cached-prefix", 0) >= 1
        assert _cached_prefix(gw) == before + 1
        # Other long prompts fill the 80-block cache: the target's blocks are evicted.
        for i in range(12):
            _direct(
                replicas[0], [_system(f"filler-{i}", rules=30), {"role": "user", "content": "x"}]
            )
        assert any(
            isinstance(e, BlockRemoved) and first in e.block_hashes for e in _events(replicas[0])
        )
        _synced(gw, replicas[0], 0)
        before = _cached_prefix(gw)
        ask()
        # No longer routed by the cache: affinity decides, with its own reason.
        assert _cached_prefix(gw) == before


def _cached_prefix(gw: Gateway) -> int:
    return sum(v.get("cached-prefix", 0) for v in _decisions(gw).values())


def _synced(gw: Gateway, replica: Replica, index: int) -> None:
    """Waits until the gateway has applied every batch the engine has published."""
    last = _batches(replica)[-1][0]

    def applied() -> bool:
        seq = _routing(gw)[index]["kv_events_seq"]
        return seq is not None and seq >= last  # the first batch is number 0

    _wait(applied, f"the gateway to apply batch {last}")


def test_a_gap_is_filled_from_replay_or_forgets_the_replica(replicas, tiny_model) -> None:  # type: ignore[no-untyped-def]
    r = replicas[1]
    # The replicas are shared: earlier traffic may have evicted every block of the oldest
    # batches, so the lost batch is one of this test's own, after blocks that are still cached.
    earlier = len(_batches(r))
    for i in range(3):
        _direct(r, [_system(f"gap-{i}", rules=6), {"role": "user", "content": "q"}])
    batches = _batches(r)
    assert len(batches) >= earlier + 3
    lost_seq = batches[earlier + 1][0]
    dep = Deployment("m", 0, DeploymentSettings(url=r.proc.url, served_name=TINY))
    full = BlockIndex(1)
    for _, payload in batches:
        full.apply(0, decode_batch(payload))

    def feed(replay: str | None) -> tuple[Subscriber, list[str]]:
        why: list[str] = []
        sub = Subscriber(
            dep,
            KvEventsSettings(endpoint=r.events, replay_endpoint=replay),
            BlockIndex(1),
            on_resync=lambda _d, reason: why.append(reason),
        )

        async def run() -> None:
            for seq, payload in batches:
                if seq != lost_seq:  # one batch lost on the way
                    await sub.receive(seq, payload)

        asyncio.run(run())
        return sub, why

    replayed, why = feed(r.replay)
    assert why == [] and replayed.index.blocks(0) == full.blocks(0)
    lost, why = feed(None)
    assert why == ["gap"] and lost.index.blocks(0) < full.blocks(0)


def test_engine_load_is_scraped(gateway, replicas) -> None:  # type: ignore[no-untyped-def]
    gw, _, _ = gateway
    # Its own traffic first: the event counter below must not depend on earlier tests.
    _direct(replicas[0], [_system("scrape"), {"role": "user", "content": "q"}])
    _synced(gw, replicas[0], 0)
    rows = _wait(
        lambda: (
            (rows := _routing(gw)) and all(r["kv_cache_usage"] is not None for r in rows) and rows
        ),
        "a scrape",
    )
    assert all(r["queue_depth"] == 0 and 0 <= r["kv_cache_usage"] <= 1 for r in rows)
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert re.search(r'^bastion_deployment_queue_depth\{deployment="pair\[0\]"\} 0\.0$', text, re.M)
    assert re.search(r'^bastion_deployment_kv_cache_usage\{deployment="pair\[1\]"\} ', text, re.M)
    assert re.search(r'^bastion_kv_event_batches_total\{deployment="pair\[0\]"\} [1-9]', text, re.M)


def test_a_dead_engine_is_forgotten_and_its_restart_relearned(gateway, replicas) -> None:  # type: ignore[no-untyped-def]
    """Last in this module: it restarts replica 1."""
    gw, _, _ = gateway
    r = replicas[1]
    _direct(r, [_system("restart"), {"role": "user", "content": "q"}])
    _synced(gw, r, 1)
    assert _routing(gw)[1]["cached_blocks"] > 0
    r.proc.kill()
    row = _wait(
        lambda: (row := _routing(gw)[1])["kv_events"] == "down" and row, "health checks: down"
    )
    assert row["cached_blocks"] == 0 and row["kv_events_seq"] is None
    r.proc.start()  # a new engine process: its sequence starts at 0 again, its cache empty
    r.proc.wait_ready(timeout=420)
    _direct(r, [_system("restart"), {"role": "user", "content": "q"}])
    row = _wait(lambda: (row := _routing(gw)[1])["kv_events"] == "live" and row, "events again", 30)
    assert row["cached_blocks"] > 0 and row["kv_events_seq"] == _batches(r)[-1][0]
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert re.search(
        r'^bastion_kv_event_resyncs_total\{deployment="pair\[1\]",reason="down"\} 1\.0$', text, re.M
    )
