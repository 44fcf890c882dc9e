"""The planner's KV cache figures against what a real vLLM engine allocates at start.

Two CPU engines get the same explicit KV cache size (--kv-cache-memory-bytes) and log what
it holds ("CPU KV cache size: N tokens, Maximum concurrency for 4,096 tokens per request:
X x"). The tiny model (bf16, full attention, GQA 2/1 x 64) checks bytes per token: N tokens
must fill the bytes to within one block. A second model (fp32 checkpoint served in bf16, GQA
4/2 x 32, sliding-window layers between full ones) checks bytes per sequence, windows, the
tokens in flight and block rounding: the planner's sequences per cache must match vLLM's
maximum concurrency within 1%.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bastion.local.launcher import EngineSpec, VllmProcess, engine_python, free_port
from bastion.plan.capacity import Scheduler, kv_bytes_per_sequence, kv_bytes_per_token, plan
from bastion.plan.gpus import gpu
from bastion.plan.model import load_shape

KV_BYTES = 32 * 1024 * 1024
CONTEXT = 4096
#: Set explicitly so that the comparison does not depend on vLLM's CPU defaults.
BATCHED, BLOCK = 512, 128
ENGINE_ARGS = (
    "--max-num-batched-tokens",
    str(BATCHED),
    "--block-size",
    str(BLOCK),
    "--no-async-scheduling",
)
LOGGED = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
    r"([\d.]+)x"
)
SCHEDULER = Scheduler(max_num_batched_tokens=BATCHED, block_size=BLOCK, async_scheduling=False)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def hybrid_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hybrid") / "model"
    subprocess.run(
        [str(engine_python()), str(HERE / "make_hybrid_model.py"), str(tiny_model), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def _logged(model: Path, logs: Path) -> tuple[int, float]:
    """Starts the engine, reads what it logged of its KV cache, stops it."""
    engine = VllmProcess(
        EngineSpec(
            model,
            model.name,
            free_port(),
            max_model_len=CONTEXT,
            kv_cache_memory_bytes=KV_BYTES,
            extra_args=ENGINE_ARGS,
        ),
        log_path=logs / f"{model.name}.log",
    )
    engine.start()
    try:
        engine.wait_ready(timeout=420)
        assert engine.log_path is not None
        found = LOGGED.search(engine.log_path.read_text(errors="replace"))
        assert found, engine.log_tail()
        assert int(found.group(2).replace(",", "")) == CONTEXT
        return int(found.group(1).replace(",", "")), float(found.group(3))
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def measured(
    tiny_model: Path, hybrid_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, float]]:
    """Both engines, started side by side; each stopped once it has logged its KV cache."""
    logs = tmp_path_factory.mktemp("plan-engine-logs")
    with ThreadPoolExecutor(2) as pool:
        runs = {m: pool.submit(_logged, m, logs) for m in (tiny_model, hybrid_model)}
        return {"tiny": runs[tiny_model].result(), "hybrid": runs[hybrid_model].result()}


def test_kv_bytes_per_token_match_vllm(
    tiny_model: Path, measured: dict[str, tuple[int, float]]
) -> None:
    shape, _ = load_shape(tiny_model)
    per_token = kv_bytes_per_token(shape, 2)  # bf16 KV cache ("auto")
    assert per_token == 2 * 2 * 1 * 64 * 2  # layers x (K, V) x KV heads x head_dim x bytes
    tokens, concurrency = measured["tiny"]
    print(
        f"tiny: planner {per_token:.0f} B/token; vLLM {tokens:,} tokens in {KV_BYTES:,} B "
        f"= {KV_BYTES / tokens:.1f} B/token, {concurrency}x {CONTEXT}"
    )
    # vLLM fills whole blocks: the bytes hold N tokens and less than one block more.
    assert tokens * per_token <= KV_BYTES < (tokens + BLOCK) * per_token
    planned = plan(shape, None, gpu("l4-24gb"), context=CONTEXT, concurrency=1, scheduler=SCHEDULER)
    assert planned["kv_cache"]["bytes_per_token"] == per_token


def test_sliding_window_sequences_match_vllm(
    hybrid_model: Path, measured: dict[str, tuple[int, float]]
) -> None:
    shape, weights = load_shape(hybrid_model)
    assert weights is not None and shape.layer_windows() == (128, None, 128, None)
    planned = plan(
        shape, weights, gpu("l4-24gb"), context=CONTEXT, concurrency=1, scheduler=SCHEDULER
    )
    assert planned["kv_cache"]["bytes_per_token"] == 4 * 2 * 2 * 32 * 2  # served in bf16
    per_seq = kv_bytes_per_sequence(shape, 2, CONTEXT, in_flight=BATCHED, block=BLOCK)
    assert planned["kv_cache"]["bytes_per_sequence"] == per_seq
    # By hand: 2 full layers x 4096 tokens; 2 sliding layers x (127 + 512 tokens in flight,
    # rounded up to 5 blocks of 128, plus one block) = 768 tokens; 256 bytes a token a layer.
    assert per_seq == 256 * (2 * 4096 + 2 * 768)
    tokens, concurrency = measured["hybrid"]
    print(
        f"hybrid: planner {KV_BYTES / per_seq:.3f} sequences of {CONTEXT}; vLLM "
        f"{concurrency}x ({tokens:,} tokens)"
    )
    assert KV_BYTES / per_seq == pytest.approx(concurrency, rel=0.01)
    # Weights: the fp32 file is twice what vLLM holds in bf16.
    assert weights.bytes(2) * 2 == weights.bytes(4) == weights.params * 4
