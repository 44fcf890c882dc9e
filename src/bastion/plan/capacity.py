"""The capacity estimate: weights, KV cache, the tensor/pipeline-parallel layouts that fit on
a GPU, how many sequences of a context length each holds, and a decode throughput range.

The method, its allowances and its limits are in docs/capacity.md. Every figure is an
estimate from the model's shape and the GPU's data sheet, except the weight bytes when the
safetensors headers are read and the KV bytes per token, which are what vLLM allocates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bastion.plan.gpus import Gpu
from bastion.plan.model import ModelShape, PlanError, WeightInfo, dtype_bytes

__all__ = ["Allowances", "Scheduler", "kv_bytes_per_sequence", "kv_bytes_per_token", "plan"]

GIB = 1024**3
TENSOR_PARALLEL = (1, 2, 4, 8)
PIPELINE_PARALLEL = (1, 2, 4)


@dataclass(frozen=True)
class Allowances:
    """What vLLM takes besides weights and KV cache, per GPU (docs/capacity.md says why)."""

    gpu_memory_utilization: float = 0.9
    #: CUDA context, allocator slack and other memory outside PyTorch's pool.
    non_torch_bytes: int = 3 * GIB // 4
    #: NCCL buffers when the model spans GPUs (tensor or pipeline parallel).
    nccl_bytes: int = GIB // 2
    #: CUDA graphs captured for decode batch sizes (0 with --enforce-eager).
    cuda_graph_bytes: int = GIB
    #: Share of peak memory bandwidth a decode step achieves (low, high).
    bandwidth_efficiency: tuple[float, float] = (0.5, 0.8)
    #: Share of peak dense BF16 FLOP/s (bounds decode at large batches), (low, high).
    compute_efficiency: tuple[float, float] = (0.3, 0.5)


@dataclass(frozen=True)
class Scheduler:
    """vLLM's scheduler settings that decide memory; None: vLLM's default for the GPU."""

    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    #: Tokens per KV block: 16 on GPUs (vLLM's default); a hybrid model may get a larger one.
    block_size: int = 16
    #: On by default on GPUs: two batches in flight (pp batches with pipeline parallelism).
    async_scheduling: bool = True

    def in_flight(self, batched: int, pp: int) -> int:
        """Tokens scheduled but not settled (VllmConfig.max_in_flight_tokens): what a
        sliding-window layer holds beyond its window."""
        return batched * (pp if pp > 1 else 2 if self.async_scheduling else 1)


def _act_bytes(dtype: str | None) -> float:
    """The compute dtype's size, which `--kv-cache-dtype auto` follows: vLLM's `--dtype auto`
    serves bf16 and fp16 checkpoints as they are and fp32 ones in bf16; fp8 and int weights
    compute in bf16. Only an explicit float --dtype changes it."""
    if dtype and dtype.lower() in ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16"):
        return dtype_bytes(dtype)
    return 2


def kv_bytes_per_token(shape: ModelShape, kv_bytes: float) -> float:
    """KV cache bytes one token costs in all layers (full attention)."""
    return shape.layers * shape.kv_elements_per_layer() * kv_bytes


def kv_bytes_per_sequence(
    shape: ModelShape, kv_bytes: float, context: int, in_flight: int = 0, block: int = 1
) -> float:
    """What vLLM reserves for one sequence of `context` tokens, in whole blocks. A
    sliding-window layer holds its window, plus the tokens in flight (freed only once
    processed), plus one block because the window need not start on a block boundary."""
    per_layer = shape.kv_elements_per_layer() * kv_bytes
    total = 0.0
    for w in shape.layer_windows():
        tokens = min(w - 1 + in_flight, context) if w else context
        total += per_layer * (-(-tokens // block) * block + (block if w else 0))
    return total


def _weights(
    shape: ModelShape, info: WeightInfo | None, dtype: str | None, act: float
) -> tuple[float, float, str]:
    """(all weight bytes, routed-expert bytes, source). Embeddings and the LM head stay in
    the activation dtype when the rest is quantized, as vLLM loads fp8/int4 checkpoints."""
    if info is not None and dtype is None:
        return (
            info.bytes(act),
            info.expert_bytes(act),
            f"safetensors headers ({info.files} file(s))",
        )
    total, routed = shape.params()
    if info is not None and shape.quantized_bytes is None:
        total = info.params  # the real count; the config formula misses odd layers
    wb = dtype_bytes(dtype) if dtype else shape.quantized_bytes or act
    embed = shape.vocab * shape.hidden * (1 if shape.tie_embeddings else 2)
    source = f"parameters from config.json x {wb:g} bytes" if dtype is None or not info else ""
    source = source or f"parameters from safetensors x {wb:g} bytes (--dtype)"
    return (total - embed) * wb + embed * act, routed * wb, source


def _allowance_activations(
    shape: ModelShape, tp: int, batched: int, seqs: int, act: float
) -> float:
    """Peak activation memory vLLM's profiling run measures: one forward pass of
    max_num_batched_tokens (residual stream and the widest MLP slice on this GPU) plus the
    sampler's float32 logits for max_num_seqs rows (two copies)."""
    mlp = shape.intermediate if shape.dense_layers or not shape.experts else 0
    if shape.experts:
        moe = shape.experts_per_token * shape.moe_intermediate
        mlp = max(mlp, moe + shape.shared_experts * shape.moe_intermediate)
    per_token = (4 * shape.hidden + 3 * mlp / tp) * act
    return batched * per_token + seqs * shape.vocab * 4 * 2


def plan(
    shape: ModelShape,
    weights: WeightInfo | None,
    gpu: Gpu,
    *,
    context: int,
    concurrency: int,
    dtype: str | None = None,
    kv_dtype: str = "auto",
    allowances: Allowances | None = None,
    scheduler: Scheduler | None = None,
) -> dict[str, Any]:
    """The whole estimate as plain data (the CLI prints it as a table or JSON)."""
    if context <= 0 or concurrency <= 0:
        raise PlanError("--context and --concurrency must be positive")
    a = allowances or Allowances()
    if not 0 < a.gpu_memory_utilization <= 1:
        raise PlanError("--gpu-memory-utilization must be in (0, 1]")
    sched = scheduler or Scheduler()
    knobs = (sched.block_size, sched.max_num_batched_tokens or 1, sched.max_num_seqs or 1)
    if min(knobs) < 1:
        raise PlanError("--block-size, --max-num-batched-tokens and --max-num-seqs must be >= 1")
    act = _act_bytes(dtype)
    kvb = act if kv_dtype == "auto" else dtype_bytes(kv_dtype)
    w_total, w_experts, w_source = _weights(shape, weights, dtype, act)
    params, routed = shape.params()
    if weights is not None and shape.quantized_bytes is None and dtype is None:
        params = weights.params
    active = params - routed + (routed * shape.experts_per_token / shape.experts if routed else 0)
    per_token = kv_bytes_per_token(shape, kvb)
    # vLLM's defaults for an OpenAI server grow with the GPU (EngineArgs, >= 70 GiB).
    big = gpu.memory_bytes >= 70 * GIB
    batched = sched.max_num_batched_tokens or (8192 if big else 2048)
    max_seqs = sched.max_num_seqs or (1024 if big else 256)
    in_flight = sched.in_flight(batched, 1)
    per_seq = kv_bytes_per_sequence(shape, kvb, context, in_flight, sched.block_size)
    warnings = []
    if shape.max_position and context > shape.max_position:
        warnings.append(
            f"--context {context} exceeds the model's max_position_embeddings "
            f"({shape.max_position}); vLLM refuses a longer --max-model-len"
        )
    job = _Job(shape, gpu, a, sched, act, kvb, w_total, w_experts, active, context,
               concurrency, batched, max_seqs)  # fmt: skip
    layouts = [
        row
        for pp in PIPELINE_PARALLEL
        for tp in TENSOR_PARALLEL
        if (row := _layout(job, tp, pp)) is not None
    ]
    fitting = [r for r in layouts if r["fits"]]
    best = min(fitting, key=lambda r: (r["total_gpus"], r["gpus"]), default=None)
    return {
        "model": {
            "type": shape.model_type,
            "layers": shape.layers,
            "attention": shape.attention,
            "heads": shape.heads,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "kv_elements_per_layer": shape.kv_elements_per_layer(),
            "experts": shape.experts,
            "experts_per_token": shape.experts_per_token,
            "sliding_window_layers": sum(1 for w in shape.layer_windows() if w),
            "params": params,
            "active_params_per_token": int(active),
        },
        "weights": {"bytes": int(w_total), "gib": round(w_total / GIB, 2), "source": w_source},
        "kv_cache": {
            "dtype_bytes": kvb,
            "bytes_per_token": int(per_token),
            "bytes_per_sequence": int(per_seq),
            "gib_per_sequence": round(per_seq / GIB, 3),
            "context": context,
        },
        "gpu": asdict(gpu),
        "concurrency": concurrency,
        "allowances": asdict(a),
        "scheduler": {**asdict(sched), "max_num_batched_tokens": batched, "max_num_seqs": max_seqs},
        "layouts": layouts,
        "recommended": best,
        "warnings": warnings,
        "note": "estimates: memory from the model's shape; throughput is the memory-bandwidth "
        "(and compute) bound of decode, not a measurement",
    }


@dataclass(frozen=True)
class _Job:
    shape: ModelShape
    gpu: Gpu
    a: Allowances
    sched: Scheduler
    act: float
    kvb: float
    w_total: float
    w_experts: float
    active: float
    context: int
    concurrency: int
    batched: int
    max_seqs: int


def _layout(j: _Job, tp: int, pp: int) -> dict[str, Any] | None:
    shape, gpu, a, kvb, context = j.shape, j.gpu, j.a, j.kvb, j.context
    # vLLM splits attention heads evenly; KV heads are split, or replicated when fewer than tp.
    if shape.heads % tp or pp > shape.layers:
        return None
    if not shape.mla and shape.kv_heads % tp and tp % shape.kv_heads:
        return None
    # MLA's latent is not split by tensor parallelism: every GPU caches all of it.
    shard = 1.0 if shape.mla else max(1, shape.kv_heads // tp) / shape.kv_heads
    stage = math.ceil(shape.layers / pp) / shape.layers
    embed = shape.vocab * shape.hidden * j.act
    embeds = embed * (1 if shape.tie_embeddings else 2)
    # With pp > 1 the first stage holds the embedding and the last the LM head.
    w_gpu = ((j.w_total - embeds) * stage + (embeds if pp == 1 else embed)) / tp
    overhead = a.non_torch_bytes + a.cuda_graph_bytes + (a.nccl_bytes if tp * pp > 1 else 0)
    overhead += _allowance_activations(shape, tp, j.batched, j.max_seqs, j.act)
    kv_avail = gpu.memory_bytes * a.gpu_memory_utilization - w_gpu - overhead
    in_flight = j.sched.in_flight(j.batched, pp)
    seq_gpu = kv_bytes_per_sequence(shape, kvb, context, in_flight, j.sched.block_size)
    seq_gpu *= shard * stage
    concurrency_at_context = max(kv_avail, 0) / seq_gpu
    seqs = int(concurrency_at_context)
    row: dict[str, Any] = {
        "tp": tp,
        "pp": pp,
        "gpus": tp * pp,
        "weights_gib_per_gpu": round(w_gpu / GIB, 2),
        "overhead_gib_per_gpu": round(overhead / GIB, 2),
        "kv_cache_gib_per_gpu": round(max(kv_avail, 0) / GIB, 2),
        # As vLLM logs it: how many sequences of --context fit, times --context.
        "kv_cache_tokens": int(concurrency_at_context * context),
        "sequences": seqs,
        "fits": seqs >= 1,
    }
    if not row["fits"]:
        return {**row, "replicas": None, "total_gpus": None, "decode_tokens_per_s": None}
    per_replica = min(seqs, j.max_seqs)
    replicas = math.ceil(j.concurrency / per_replica)
    b = min(per_replica, math.ceil(j.concurrency / replicas))
    rates = []
    for i, avg_ctx in ((0, context), (1, context / 2)):
        eff, mfu = a.bandwidth_efficiency[i], a.compute_efficiency[i]
        w_read = j.w_total - j.w_experts
        if j.w_experts:  # experts a batch touches: E*(1 - (1 - k/E)^b), uniform routing
            k_over_e = shape.experts_per_token / shape.experts
            w_read += j.w_experts * (1 - (1 - k_over_e) ** b)
        # Per decode round (every sequence one token): each GPU reads its weight shard once
        # per micro-batch (pp of them) and its KV share of every sequence (a sliding layer
        # only its window).
        kv_read = b * kv_bytes_per_sequence(shape, kvb, int(avg_ctx)) * shard / pp
        t_mem = (w_read / tp + kv_read) / (gpu.bandwidth_tb_s * 1e12 * eff)
        t_flop = b * 2 * j.active / (tp * pp) / (gpu.bf16_tflops * 1e12 * mfu)
        rates.append((b / max(t_mem, t_flop), "memory" if t_mem >= t_flop else "compute"))
    return {
        **row,
        "replicas": replicas,
        "total_gpus": replicas * tp * pp,
        "batch_per_replica": b,
        "decode_tokens_per_s": {
            "per_replica": [round(rates[0][0]), round(rates[1][0])],
            "total": [round(rates[0][0] * replicas), round(rates[1][0] * replicas)],
            "per_sequence": [round(rates[0][0] / b, 1), round(rates[1][0] / b, 1)],
            "bound": rates[0][1],
        },
    }
