"""The capacity planner against the published shapes of known models (tests/plan/configs are
their real config.json files): every figure asserted here is worked out by hand in the test."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from bastion.plan.capacity import (
    Allowances,
    Scheduler,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    plan,
)
from bastion.plan.gpus import gpu
from bastion.plan.model import ModelShape, PlanError, load_shape, read_weights, shape_from_config

CONFIGS = Path(__file__).parent / "configs"
GIB = 1024**3
MIB = 1024**2


def shape(name: str) -> ModelShape:
    return shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def layout(result: dict[str, Any], tp: int, pp: int = 1) -> dict[str, Any]:
    return next(r for r in result["layouts"] if (r["tp"], r["pp"]) == (tp, pp))


@pytest.mark.parametrize(
    ("name", "params", "attention", "kv_per_token"),
    [
        # The parameter counts the model cards publish (DeepSeek-V3: 671B without its MTP
        # layer). KV per token = layers x 2 (K and V) x KV heads x head_dim x 2 bytes (bf16).
        ("llama-3-8b", 8_030_261_248, "GQA", 32 * 2 * 8 * 128 * 2),  # 131,072
        ("qwen2.5-7b", 7_615_616_512, "GQA", 28 * 2 * 4 * 128 * 2),  # 57,344
        ("mixtral-8x7b", 46_702_792_704, "GQA", 32 * 2 * 8 * 128 * 2),
        ("mistral-7b-v0.1", 7_241_732_096, "GQA", 32 * 2 * 8 * 128 * 2),
        # MLA caches one latent per token and layer: kv_lora_rank 512 + rope key 64.
        ("deepseek-v3", 671_026_419_200, "MLA", 61 * (512 + 64) * 2),  # 70,272
    ],
)
def test_known_models(name: str, params: int, attention: str, kv_per_token: int) -> None:
    s = shape(name)
    assert s.params()[0] == params
    assert s.attention == attention
    assert kv_bytes_per_token(s, 2) == kv_per_token


def test_mixture_of_experts_active_parameters() -> None:
    total, routed = shape("mixtral-8x7b").params()
    assert routed == 32 * 8 * 3 * 4096 * 14336  # 8 experts of gate/up/down in 32 layers
    # 2 of 8 experts per token: the published "12.9B active".
    assert total - routed + routed * 2 // 8 == 12_879_925_248
    result = plan(shape("deepseek-v3"), None, gpu("h200-141gb"), context=4096, concurrency=1)
    routed = 58 * 256 * 3 * 7168 * 2048  # 256 experts of 2048 in the 58 MoE layers
    # 8 of 256 experts per token: 37.55B with the embeddings ("37B activated").
    active = 671_026_419_200 - routed + routed * 8 // 256
    assert result["model"]["active_params_per_token"] == active == 37_552_297_472


def test_sliding_window_layers_keep_only_their_window() -> None:
    mistral = shape("mistral-7b-v0.1")  # sliding_window 4096 in every layer
    assert set(mistral.layer_windows()) == {4096}
    assert kv_bytes_per_sequence(mistral, 2, 32768) == 4096 * 131_072
    assert kv_bytes_per_sequence(mistral, 2, 2048) == (2048 + 1) * 131_072  # + the partial block
    # What vLLM reserves on an H100: the window, plus 2 x 8192 tokens in flight (async
    # scheduling), in 16-token blocks, plus one block for the window's unaligned start.
    result = plan(mistral, None, gpu("h100-80gb"), context=32768, concurrency=1)
    assert result["kv_cache"]["bytes_per_sequence"] == (4096 - 1 + 2 * 8192 + 1 + 16) * 131_072
    # Qwen2.5 declares a window but use_sliding_window is false: every layer is full.
    assert shape("qwen2.5-7b").layer_windows() == (None,) * 28
    # layer_types (transformers >= 4.53) and Gemma 2's alternation.
    base = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    types = {**base, "num_hidden_layers": 4, "sliding_window": 1024,
             "layer_types": ["sliding_attention", "full_attention"] * 2}  # fmt: skip
    assert shape_from_config(types).layer_windows() == (1024, None, 1024, None)
    per_layer = 2 * 8 * 128 * 2
    assert kv_bytes_per_sequence(shape_from_config(types), 2, 8192) == per_layer * (
        2 * 1024 + 2 * 8192
    )
    gemma2 = {**base, "model_type": "gemma2", "num_hidden_layers": 3, "sliding_window": 4096}
    assert shape_from_config(gemma2).layer_windows() == (4096, None, 4096)


def test_llama_3_8b_on_one_h100_by_hand() -> None:
    result = plan(shape("llama-3-8b"), None, gpu("h100-80gb"), context=32768, concurrency=64)
    weights = 8_030_261_248 * 2  # bf16
    assert result["weights"]["bytes"] == weights
    assert result["kv_cache"]["bytes_per_sequence"] == 32768 * 131_072  # 4 GiB
    overhead = (
        0.75 * GIB  # CUDA context and memory outside PyTorch
        + 1 * GIB  # CUDA graphs
        + 8192 * (4 * 4096 + 3 * 14336) * 2  # profiled batch: residual stream and MLP
        + 1024 * 128_256 * 4 * 2  # sampler: float32 logits of max_num_seqs rows, 2 copies
    )
    kv = 81559 * MIB * 0.9 - weights - overhead  # gpu_memory_utilization 0.9
    row = layout(result, tp=1)
    assert row["kv_cache_tokens"] == int(kv // 131_072) == 434_916
    assert row["sequences"] == int(kv // (4 * GIB)) == 13
    assert (row["replicas"], row["total_gpus"], row["batch_per_replica"]) == (5, 5, 13)
    # Decode, memory-bound: each step reads the weights once and every sequence's KV cache.
    low = 13 / ((weights + 13 * 4 * GIB) / (3.35e12 * 0.5))  # full context, 50% of peak
    high = 13 / ((weights + 13 * 2 * GIB) / (3.35e12 * 0.8))  # half context, 80% of peak
    assert row["decode_tokens_per_s"]["per_replica"] == [round(low), round(high)]
    assert row["decode_tokens_per_s"]["bound"] == "memory"
    # 64 sequences of 32k need tp=4 on one replica: 4 GPUs, the fewest of any layout.
    best = result["recommended"]
    assert (best["tp"], best["pp"], best["total_gpus"]) == (4, 1, 4)
    assert "max_position_embeddings (8192)" in result["warnings"][0]


def test_deepseek_v3_mla_is_replicated_across_tensor_parallel_ranks() -> None:
    result = plan(shape("deepseek-v3"), None, gpu("h200-141gb"), context=32768, concurrency=64)
    embed = 129_280 * 7168 * 2  # embedding and LM head stay bf16 in the fp8 checkpoint
    weights = (671_026_419_200 - embed) * 1 + embed * 2
    assert result["weights"]["bytes"] == weights
    assert all(not layout(result, tp)["fits"] for tp in (1, 2, 4))
    overhead = (
        0.75 * GIB
        + 1 * GIB
        + 0.5 * GIB  # NCCL
        + 8192 * (4 * 7168 + 3 * 18432 / 8) * 2  # 8 routed + 1 shared expert of 2048
        + 1024 * 129_280 * 8
    )
    kv = 143771 * MIB * 0.9 - weights / 8 - overhead
    row = layout(result, tp=8)
    # Every rank caches the whole latent (70,272 bytes a token), not an eighth of it.
    assert row["kv_cache_tokens"] == int(kv // 70_272) == 676_106
    assert row["sequences"] == int(kv // (70_272 * 32768)) == 20


def test_tensor_parallel_must_divide_heads_and_kv_heads_split_or_replicate() -> None:
    result = plan(shape("qwen2.5-7b"), None, gpu("l40s-48gb"), context=8192, concurrency=8)
    assert {r["tp"] for r in result["layouts"]} == {1, 2, 4}  # 28 heads: no tp=8
    llama = plan(shape("llama-3-8b"), None, gpu("a100-80gb"), context=8192, concurrency=8)
    one, two = layout(llama, 1), layout(llama, 2)
    assert two["kv_cache_tokens"] > 2 * one["kv_cache_tokens"]  # half the KV heads per GPU


def test_dtype_and_kv_dtype_options() -> None:
    s = shape("llama-3-8b")
    fp8 = plan(s, None, gpu("l4-24gb"), context=8192, concurrency=4, dtype="fp8", kv_dtype="fp8")
    embed = 128_256 * 4096 * 2
    assert fp8["weights"]["bytes"] == (8_030_261_248 - embed) * 1 + embed * 2
    assert fp8["kv_cache"]["bytes_per_token"] == 65_536
    with pytest.raises(PlanError, match="unknown dtype 'fp9'"):
        plan(s, None, gpu("l4-24gb"), context=8192, concurrency=1, dtype="fp9")
    with pytest.raises(PlanError, match="unknown GPU 'h300'"):
        gpu("h300")
    with pytest.raises(PlanError, match="must be positive"):
        plan(s, None, gpu("l4-24gb"), context=0, concurrency=1)
    with pytest.raises(PlanError, match="--block-size"):
        plan(s, None, gpu("l4-24gb"), context=8, concurrency=1, scheduler=Scheduler(block_size=0))
    with pytest.raises(PlanError, match=r"must be in \(0, 1\]"):
        plan(s, None, gpu("l4-24gb"), context=8, concurrency=1, allowances=Allowances(1.5))


def test_bad_configs_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no num_hidden_layers"):
        shape_from_config({"hidden_size": 8})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_shape(tmp_path)
    with pytest.raises(PlanError, match="cannot read the model's config"):
        load_shape(tmp_path / "absent")


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file as the format defines it: u64 header length, JSON header, data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    for name, (dtype, dims) in tensors.items():
        size = math.prod(dims) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_weights_come_from_the_safetensors_headers(tiny_model: Path, tmp_path: Path) -> None:
    s, info = load_shape(tiny_model)
    assert info is not None and info.files == 1
    assert info.params == info.float_params == s.params()[0]  # the formula counts the file
    f = tiny_model / "model.safetensors"
    (header_len,) = struct.unpack("<Q", f.read_bytes()[:8])
    assert info.bytes(2) == f.stat().st_size - 8 - header_len  # a bf16 checkpoint
    # Extra layers (DeepSeek's MTP) are skipped; fp8 tensors count as stored, float ones in
    # the compute dtype (vLLM serves an fp32 checkpoint in bf16).
    two_layers = shape_from_config({**json.loads((tiny_model / "config.json").read_text())})
    _safetensors(
        tmp_path / "a.safetensors",
        {
            "model.layers.0.mlp.experts.0.up_proj.weight": ("F8_E4M3", [64, 32]),
            "model.layers.1.self_attn.q_proj.weight": ("BF16", [32, 32]),
            "model.layers.2.self_attn.q_proj.weight": ("BF16", [32, 32]),  # MTP
            "model.norm.weight": ("F32", [32]),
        },
    )
    w = read_weights(tmp_path, two_layers)
    assert w is not None
    assert w.params == 64 * 32 + 32 * 32 + 32
    assert (w.bytes(2), w.expert_bytes(2)) == (64 * 32 * 1 + (32 * 32 + 32) * 2, 64 * 32)
    _safetensors(tmp_path / "b.safetensors", {"x": ("F32", [2])})
    (tmp_path / "b.safetensors").write_bytes(
        (tmp_path / "b.safetensors").read_bytes().replace(b'"F32"', b'"Q99"')
    )
    with pytest.raises(PlanError, match=r"b\.safetensors: tensor 'x' has no usable dtype/shape"):
        read_weights(tmp_path, two_layers)
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(PlanError, match="damaged"):
        read_weights(tmp_path, two_layers)
