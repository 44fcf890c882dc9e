"""A model's shape, read from its own files: `config.json` for the architecture and the
safetensors headers (only the JSON header of each file, never the tensors) for the weights.

Everything the capacity planner needs is derived here: parameters (total and active per token
for mixtures of experts), weight bytes, and the KV cache bytes one token costs in each layer
(GQA, MLA, sliding-window layers).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "ModelShape",
    "PlanError",
    "WeightInfo",
    "dtype_bytes",
    "load_shape",
    "read_weights",
    "shape_from_config",
]


class PlanError(ValueError):
    """The model or the request cannot be planned; the message says what to fix."""


#: Bytes per element. int4/AWQ/GPTQ carry one fp16 scale and zero per group of 128 weights.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "float32": 4, "f32": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "f16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "i8": 1, "u8": 1,
    "f8_e4m3": 1, "f8_e5m2": 1, "bool": 1,
    "int4": 0.5 + 4 / 128, "awq": 0.5 + 4 / 128, "gptq": 0.5 + 4 / 128,
    "mxfp4": 0.5 + 1 / 32, "f4": 0.5, "f6_e2m3": 0.75, "f6_e3m2": 0.75, "f8_e8m0": 1,
    "i16": 2, "u16": 2, "i32": 4, "u32": 4, "i64": 8, "u64": 8, "f64": 8,
}  # fmt: skip


def dtype_bytes(name: str) -> float:
    key = name.lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {name!r}: use bf16, fp16, fp32, fp8, int8 or int4")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory; names follow Hugging Face `config.json`."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    dtype: str
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    # Mixture of experts (0 experts: dense).
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    dense_layers: int = 0  # DeepSeek's first_k_dense_replace
    expert_bias: bool = False
    # Multi-head latent attention (DeepSeek): the cache holds one latent per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    #: Per layer: the sliding window (tokens) or None for full attention.
    windows: tuple[int | None, ...] = field(default=())
    #: Bytes per weight from `quantization_config` (fp8, AWQ, GPTQ), else None.
    quantized_bytes: float | None = None
    max_position: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention(self) -> str:
        if self.mla:
            return "MLA"
        if self.kv_heads == 1:
            return "MQA"
        return "GQA" if self.kv_heads < self.heads else "MHA"

    def kv_elements_per_layer(self) -> int:
        """Cached elements per token in one layer: K and V per KV head, or MLA's one latent
        (compressed KV plus the decoupled RoPE key) shared by all heads."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    def layer_windows(self) -> tuple[int | None, ...]:
        return self.windows or (None,) * self.layers

    # -- parameters, from the config alone ---------------------------------------------------
    def attention_params(self) -> int:
        h = self.hidden
        if self.mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.heads * qk
            else:
                q = h * self.heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.heads * self.v_head_dim * h
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += h
        return n

    def is_moe_layer(self, i: int) -> bool:
        return self.experts > 0 and i >= self.dense_layers

    def expert_params(self) -> int:
        """One routed expert (gated MLP: gate, up and down projections)."""
        return 3 * self.hidden * self.moe_intermediate

    def params(self) -> tuple[int, int]:
        """(all parameters, routed-expert parameters) as vLLM loads them (DeepSeek's
        multi-token-prediction layer, which vLLM serves only for speculative decoding, is out)."""
        h, total, routed = self.hidden, 0, 0
        for i in range(self.layers):
            total += self.attention_params() + 2 * h  # two RMSNorms
            if self.is_moe_layer(i):
                e = self.experts * self.expert_params()
                routed += e
                total += e + h * self.experts + (self.experts if self.expert_bias else 0)
                total += self.shared_experts * self.expert_params()
                if self.shared_intermediate:  # Qwen-MoE: one shared MLP and its gate
                    total += 3 * h * self.shared_intermediate + h
            else:
                total += 3 * h * self.intermediate
        total += self.vocab * h * (1 if self.tie_embeddings else 2) + h
        return total, routed


@dataclass(frozen=True)
class WeightInfo:
    """What the safetensors headers hold. Float tensors (F32/F16/BF16) are counted in
    elements, because vLLM loads them in its compute dtype (an fp32 checkpoint is served in
    bf16); anything else (fp8, int8, packed int4 and their scales) in bytes as stored."""

    params: int
    float_params: int
    stored_bytes: float
    expert_float_params: int
    expert_stored_bytes: float
    files: int

    def bytes(self, act: float) -> float:
        return self.float_params * act + self.stored_bytes

    def expert_bytes(self, act: float) -> float:
        return self.expert_float_params * act + self.expert_stored_bytes


def _windows(cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window, as vLLM reads the same config."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if not isinstance(window, int) or window <= 0 or cfg.get("use_sliding_window") is False:
        return ()
    mt = cfg.get("model_type", "")
    if mt == "gemma2":  # even layers slide, odd ones attend fully
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    if pattern := cfg.get("sliding_window_pattern"):  # Gemma 3: every n-th layer is full
        return tuple(None if (i + 1) % int(pattern) == 0 else window for i in range(layers))
    return (window,) * layers  # Mistral 7B v0.1 and alike: every layer


def _quantized_bytes(cfg: dict[str, Any]) -> float | None:
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8" or "fp8" in str(q.get("fmt", "")):
        return 1.0
    if method == "mxfp4":  # 4-bit values, one 8-bit scale per 32
        return DTYPE_BYTES["mxfp4"]
    if bits := q.get("bits") or q.get("w_bit"):
        return int(bits) / 8 + 4 / int(q.get("group_size") or q.get("q_group_size") or 128)
    return None


def _int(cfg: dict[str, Any], *names: str, default: int | None = None) -> int:
    for n in names:
        if isinstance(cfg.get(n), int) and not isinstance(cfg.get(n), bool):
            return int(cfg[n])
    if default is None:
        raise PlanError(
            f"config.json has no {' / '.join(names)}: not a decoder-only transformer config "
            "the planner knows"
        )
    return default


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    """The shape from a parsed `config.json` (a multimodal model's `text_config` is used)."""
    if not isinstance(cfg, dict):
        raise PlanError("config.json must be a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        outer = {k: cfg[k] for k in ("quantization_config", "torch_dtype", "dtype") if k in cfg}
        cfg = {**outer, **cfg["text_config"]}
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _int(cfg, "num_attention_heads", "n_head")
    kv_heads = _int(cfg, "num_key_value_heads", default=1 if cfg.get("multi_query") else heads)
    experts = _int(cfg, "num_local_experts", "n_routed_experts", "num_experts", default=0)
    mt = str(cfg.get("model_type", "unknown"))
    if layers <= 0 or hidden <= 0 or heads <= 0 or kv_heads <= 0:
        raise PlanError("config.json: layers, hidden_size and head counts must be positive")
    return ModelShape(
        model_type=mt,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=_int(cfg, "head_dim", default=hidden // heads),
        vocab=_int(cfg, "vocab_size"),
        intermediate=_int(cfg, "intermediate_size", "n_inner", default=4 * hidden),
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mt in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias")),
        o_bias=bool(cfg.get("attention_bias")) and mt not in ("qwen2", "qwen2_moe"),
        experts=experts,
        experts_per_token=_int(cfg, "num_experts_per_tok", "top_k", default=2 if experts else 0),
        moe_intermediate=_int(cfg, "moe_intermediate_size", "intermediate_size", default=0),
        shared_experts=_int(cfg, "n_shared_experts", default=0),
        shared_intermediate=_int(cfg, "shared_expert_intermediate_size", default=0),
        dense_layers=_int(cfg, "first_k_dense_replace", default=0),
        expert_bias=cfg.get("topk_method") == "noaux_tc",
        kv_lora_rank=_int(cfg, "kv_lora_rank", default=0),
        q_lora_rank=_int(cfg, "q_lora_rank", default=0),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", default=0),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", default=0),
        v_head_dim=_int(cfg, "v_head_dim", default=0),
        windows=_windows(cfg, layers),
        quantized_bytes=_quantized_bytes(cfg),
        max_position=_int(cfg, "max_position_embeddings", "n_positions", default=0),
    )


#: Layers numbered at or past num_hidden_layers are extra (DeepSeek's MTP): vLLM skips them.
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: Loaded in the compute dtype whatever they are stored in.
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
#: A safetensors header larger than this is not one (a guard against reading a huge blob).
MAX_HEADER = 100 * 1024 * 1024


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PlanError(f"{path}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise PlanError(f"{path}: safetensors header of {size} bytes; the file is damaged")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise PlanError(f"{path}: safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PlanError(f"{path}: safetensors header is not a JSON object")
    return header


def read_weights(model_dir: Path, shape: ModelShape) -> WeightInfo | None:
    """Weight bytes from the safetensors headers (dtypes x shapes); None if there are none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    params = floats = expert_floats = 0
    stored = expert_stored = 0.0
    for path in files:
        for name, t in _header(path).items():
            if name == "__metadata__":
                continue
            if (m := _LAYER.search(name)) and int(m.group(1)) >= shape.layers:
                continue
            try:
                n, dtype = math.prod(t["shape"]), str(t["dtype"])
                size = 0.0 if dtype in FLOAT_DTYPES else n * dtype_bytes(dtype)
            except (KeyError, TypeError, PlanError) as exc:
                raise PlanError(
                    f"{path}: tensor {name!r} has no usable dtype/shape: {exc}"
                ) from None
            expert = ".experts." in name
            params += n
            if dtype in FLOAT_DTYPES:
                floats += n
                expert_floats += n if expert else 0
            else:
                stored += size
                expert_stored += size if expert else 0
    return WeightInfo(params, floats, stored, expert_floats, expert_stored, len(files))


def load_shape(path: Path) -> tuple[ModelShape, WeightInfo | None]:
    """A model directory's (or a bare config file's) shape and, when the directory has
    safetensors files next to its config.json, their real weight sizes."""
    config = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"{config}: cannot read the model's config: {exc.strerror}") from None
    except ValueError as exc:
        raise PlanError(f"{config}: not valid JSON: {exc}") from None
    shape = shape_from_config(cfg)
    return shape, read_weights(config.parent, shape) if config.name == "config.json" else None
