"""Precise routing without an engine: the block index, the event decoder, the sequence checks,
CBOR and the scoring. (Against real vLLM replicas: test_precise_engines.py.)"""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
import pytest

from bastion.engines.settings import DeploymentSettings, KvEventsSettings
from bastion.routing.balancer import Deployment
from bastion.routing.engine_load import parse_metrics
from bastion.routing.kv_events import BlockIndex, Subscriber, as_key, decode_batch
from bastion.routing.precise import DEFAULT_SEED, Precise, PreciseKey, block_hashes, cbor
from bastion.routing.settings import PreciseSettings


def _batch(*events: dict, ts: float = 1.0) -> bytes:
    return msgspec.msgpack.encode([ts, list(events)])


def stored(*hashes: int, parent: int | None = None, medium: str = "GPU") -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": list(hashes),
        "parent_block_hash": parent,
        "token_ids": [1] * 32 * len(hashes),
        "block_size": 32,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
        "group_idx": 0,
    }


def removed(*hashes: int) -> dict:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}


def test_index_matches_leading_blocks_per_replica() -> None:
    idx = BlockIndex(3)
    idx.store(0, [1, 2, 3])
    idx.store(1, [1, 2])
    idx.store(2, [2, 3])  # holds later blocks without the first: no prefix
    assert idx.matches([1, 2, 3, 4]) == [3, 2, 0]
    assert idx.matches([9]) == [0, 0, 0]
    idx.remove(0, [2])
    assert idx.matches([1, 2, 3]) == [1, 2, 0]
    assert idx.clear(1) == 2
    assert idx.matches([1, 2, 3]) == [1, 0, 0]
    assert len(idx) == 2 + 2 and idx.blocks(2) == 2


def test_index_is_bounded_by_dropping_the_fullest_replicas_oldest() -> None:
    idx = BlockIndex(2, max_blocks=5)
    idx.store(0, [1, 2, 3, 4])
    idx.store(1, [10, 11])
    assert len(idx) == 5
    assert idx.matches([1]) == [0, 0]  # replica 0's oldest went
    assert idx.matches([2, 3, 4]) == [3, 0]
    assert idx.matches([10, 11]) == [0, 2]


def test_decoder_reads_vllm_batches_and_skips_unknown_events() -> None:
    payload = _batch(
        stored(1, 2),
        {"type": "SomethingNewer", "x": 1},
        removed(1),
        {"type": "AllBlocksCleared"},
        stored(3, medium="CPU"),
    )
    batch = decode_batch(payload)
    assert [type(e).__name__ for e in batch.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
        "BlockStored",
    ]
    idx = BlockIndex(1)
    idx.apply(0, decode_batch(_batch(stored(1, 2), stored(3, medium="CPU"))))
    assert idx.matches([1, 2]) == [2] and len(idx) == 2  # offloaded blocks do not count
    assert idx.block_size == [32]
    idx.apply(0, batch)  # ... then removed, then everything cleared
    assert len(idx) == 0
    assert as_key(b"\x00" * 24 + (5).to_bytes(8, "big")) == 5


def _subscriber(replay: str | None = None) -> tuple[Subscriber, BlockIndex, list[str]]:
    dep = Deployment("m", 0, DeploymentSettings(url="http://127.0.0.1:1", served_name="m"))
    idx = BlockIndex(1)
    why: list[str] = []
    sub = Subscriber(
        dep,
        KvEventsSettings(endpoint="tcp://127.0.0.1:1", replay_endpoint=replay),
        idx,
        on_resync=lambda _d, r: why.append(r),
    )
    return sub, idx, why


def test_a_gap_without_replay_forgets_the_replica_and_counts_it() -> None:
    sub, idx, why = _subscriber()

    async def run() -> None:
        await sub.receive(0, _batch(stored(1, 2)))
        await sub.receive(1, _batch(stored(3, parent=2)))
        assert idx.matches([1, 2, 3]) == [3] and not why
        await sub.receive(3, _batch(stored(7)))  # batch 2 never came: its removals are unknown
        assert why == ["gap"] and idx.matches([1]) == [0] and idx.matches([7]) == [1]
        await sub.receive(0, _batch(stored(8)))  # the sequence went back: a new engine
        assert why == ["gap", "restart"] and idx.matches([7]) == [0] and idx.matches([8]) == [1]
        await sub.receive(1, b"\xc1")  # not msgpack
        assert why[-1] == "undecodable" and sub.expected == 2

    asyncio.run(run())
    assert sub.state == "live" and sub.resyncs == 3


def test_cbor_is_rfc_8949() -> None:
    # Appendix A examples.
    assert cbor(0).hex() == "00" and cbor(23).hex() == "17" and cbor(24).hex() == "1818"
    assert cbor(1000).hex() == "1903e8" and cbor(1000000).hex() == "1a000f4240"
    assert cbor(1000000000000).hex() == "1b000000e8d4a51000" and cbor(-1).hex() == "20"
    assert cbor(-1000).hex() == "3903e7" and cbor(None).hex() == "f6"
    assert cbor("IETF").hex() == "6449455446" and cbor(b"\x01\x02\x03\x04").hex() == "4401020304"
    assert cbor((1, (2, 3), [4, 5])).hex() == "8301820203820405"
    with pytest.raises(TypeError):
        cbor(1.5)


def test_block_hashes_chain_full_blocks_only() -> None:
    parent = hashlib.sha256(cbor(DEFAULT_SEED)).digest()
    tokens = list(range(70))
    hs = block_hashes(tokens, 32, parent)
    assert len(hs) == 2  # the last 6 tokens are no full block
    first = hashlib.sha256(cbor((parent, tuple(tokens[:32]), None))).digest()
    second = hashlib.sha256(cbor((first, tuple(tokens[32:64]), None))).digest()
    assert hs == [int.from_bytes(first[-8:], "big"), int.from_bytes(second[-8:], "big")]
    salted = block_hashes(tokens, 32, parent, (("cache_salt", "s"),))
    assert salted[0] != hs[0]


def _precise(n: int = 3) -> tuple[Precise, list[Deployment]]:
    deps = [
        Deployment("m", i, DeploymentSettings(url=f"http://10.0.0.{i}:8000", served_name="m"))
        for i in range(n)
    ]
    p = Precise(deps, PreciseSettings(), load_factor=1.25)
    return p, deps


def test_scoring_prefers_the_longest_cached_prefix_within_the_load_bound() -> None:
    p, deps = _precise()
    p.index.store(1, [1, 2, 3])
    p.index.store(2, [1, 2])
    key = PreciseKey({32: [1, 2, 3, 4]}, None)
    p.index.block_size[:] = [32, 32, 32]
    order = p.order(deps, key)
    assert [(d.index, why) for d, why in order] == [
        (1, "cached-prefix"),
        (2, "fallback-to-available"),
        (0, "fallback-to-available"),
    ]
    # Replica 1 at the bound: ceil(1.25 * (4 + 1) / 3) = 3 in flight at most.
    deps[1].in_flight = 3
    deps[0].in_flight = 1
    d, why = p.order(deps, key)[0]
    assert (d.index, why) == (2, "spill")
    # Nothing cached anywhere: affinity decides (its reason).
    d, why = p.order(deps, PreciseKey({32: [99]}, None))[0]
    assert why == "least-loaded"
    deps[1].healthy = False
    d, why = p.order(deps, key)[0]
    assert d.index == 2


def test_vllm_metrics_are_parsed() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="0",model_name="other"} 9.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25\n'
    )
    assert parse_metrics(text, "m") == {
        "queue_depth": 3.0,
        "running": 2.0,
        "kv_cache_usage": 0.375,
    }
    with pytest.raises(ValueError):
        parse_metrics("# nothing\n", "m")


def test_precise_mode_needs_the_models_tokenizer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bastion.config import ConfigError
    from bastion.routing.balancer import ModelRoute
    from bastion.routing.settings import ModelSettings

    deps = [{"url": f"http://10.0.0.{i}:8000", "served_name": "m"} for i in range(2)]
    with pytest.raises(ConfigError, match=r"needs models\.m\.tokenizer"):
        ModelRoute.build("m", ModelSettings(deployments=deps, routing={"mode": "precise"}))
    with pytest.raises(ConfigError, match=r"models\.m\.tokenizer: cannot load"):
        ModelRoute.build(
            "m",
            ModelSettings(deployments=deps, routing={"mode": "precise"}, tokenizer=str(tmp_path)),
        )


def test_equal_cached_prefixes_follow_affinity_and_engine_queues_count_in_the_bound() -> None:
    from bastion.routing.affinity import Key
    from bastion.routing.precise import LoadView

    p, deps = _precise(2)
    p.index.block_size[:] = [32, 32]
    p.index.store(0, [1, 2])
    p.index.store(1, [1, 2])
    fallback = Key(None, [12345])
    owner = p.affinity.order(deps, fallback)[0][0].index
    other = 1 - owner
    deps[owner].in_flight = 1  # busier, still within the bound: ceil(1.25 * 2 / 2) = 2
    key = PreciseKey({32: [1, 2, 3]}, fallback)
    assert [(d.index, why) for d, why in p.order(deps, key)][0] == (owner, "cached-prefix")

    class Queued(LoadView):  # the engine reports requests from other gateways
        def load(self, deployment: Deployment) -> tuple[float, float]:
            return (6.0, 0.9) if deployment.index == owner else (0.0, 0.1)

    p.engine = Queued()
    assert [(d.index, why) for d, why in p.order(deps, key)][0] == (other, "cached-prefix")
