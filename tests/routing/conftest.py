"""Two extra vLLM replicas of the tiny model, started once per session and shared by the routing
modules that need two real replicas (affinity and precise routing): each start costs minutes of
CPU here, and both modules' assertions hold with one configuration, the union of their needs:

- a small KV cache (80 blocks of 32 tokens), so that a few long prompts fill it and evict;
- prefix caching with the sha256_cbor block hash and a fixed PYTHONHASHSEED, and KV-cache events
  published over ZMQ, so that Bastion's precise routing can mirror each replica's cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bastion.local.launcher import EngineSpec, VllmProcess, free_port
from tests.conftest import TINY

#: vLLM's block hashes depend on it; Bastion's `hash_seed` must equal it.
HASH_SEED = "1234"
BLOCK = 32
SMALL_CACHE = ("--block-size", str(BLOCK), "--num-gpu-blocks-override", "80")


class Replica(SimpleNamespace):
    proc: VllmProcess
    events: str
    replay: str
    #: Bastion listens and the engine connects (vLLM connects for a non-wildcard endpoint).
    bind: bool


def _replica(i: int, tiny_model: Path, engine_logs: Path) -> Replica:
    pub, replay = free_port(), free_port()
    bind = i == 1
    kv = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # Replica 0: a wildcard, which vLLM binds; replica 1: a plain address, which vLLM
        # connects to (Bastion binds it).
        "endpoint": f"tcp://127.0.0.1:{pub}" if bind else f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay}",
        "topic": "kv",
    }
    args = (*SMALL_CACHE, "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor")
    args += ("--kv-events-config", json.dumps(kv))
    spec = EngineSpec(
        tiny_model, TINY, free_port(), gpu_memory_utilization=0.05, max_model_len=2048,
        extra_args=args,
    )  # fmt: skip
    proc = VllmProcess(
        spec, log_path=engine_logs / f"replica-{i}.log", env={"PYTHONHASHSEED": HASH_SEED}
    )
    return Replica(
        proc=proc, events=f"tcp://127.0.0.1:{pub}", replay=f"tcp://127.0.0.1:{replay}", bind=bind
    )


# Package scope: stopped once the routing tests are done (an idle vLLM CPU engine keeps
# its threads spinning, which slowed every later test).
@pytest.fixture(scope="package")
def _replica_pair(tiny_model: Path, engine_logs: Path) -> Iterator[list[Replica]]:
    out = [_replica(i, tiny_model, engine_logs) for i in range(2)]
    try:
        for r in out:
            r.proc.start()
        for r in out:
            r.proc.wait_ready(timeout=420)
        yield out
    finally:
        for r in out:
            r.proc.stop()


@pytest.fixture(scope="module")
def replica_pair(_replica_pair: list[Replica]) -> list[Replica]:
    """The shared pair, both replicas up: a module that killed one (and failed before starting
    it again) does not take the next module down with it."""
    for r in _replica_pair:
        if not r.proc.is_running():
            r.proc.start()
    for r in _replica_pair:
        r.proc.wait_ready(timeout=420)
    return _replica_pair
