"""`bastion plan --model PATH|NAME@VERSION --gpu h100-80gb --context 32768 --concurrency 64`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from bastion.plan.capacity import Allowances, Scheduler, plan
from bastion.plan.gpus import GPUS, gpu
from bastion.plan.model import PlanError, load_shape

__all__ = ["add_commands", "cmd_plan", "resolve_model"]

#: The registry states whose files may be sized: validated ones are planned before approval.
PLANNABLE = ("validated", "approved")


def resolve_model(value: str, config: str | None) -> Path:
    """A model directory, a config file (`.json`: shape only), or a registry version
    NAME@VERSION whose recorded files still match (bastion.registry.records.model_dir)."""
    p = Path(value).expanduser()
    if p.is_file() and p.suffix == ".json":
        return p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PlanError(f"{p}: no config.json in this directory")
        return p
    if "@" in value and not p.exists():
        from bastion.config import load_settings
        from bastion.core.errors import BastionError
        from bastion.identity.teams import open_store
        from bastion.registry.records import model_dir

        try:
            return model_dir(open_store(load_settings(config)), value, PLANNABLE)
        except BastionError as exc:
            raise PlanError(f"model {value}: {exc.message}") from None
    raise PlanError(f"model {value!r} is neither a model directory nor a registry NAME@VERSION")


def _gib(n: float) -> str:
    if n < 1024**3:  # small models: the test model is a few MiB
        return f"{n / 1024**2:,.2f} MiB"
    return f"{n / 1024**3:,.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def render_table(result: dict[str, Any], model: str) -> str:
    m, w, kv, g = result["model"], result["weights"], result["kv_cache"], result["gpu"]
    heads = f"{m['heads']} heads / {m['kv_heads']} KV heads x {m['head_dim']}"
    if m["attention"] == "MLA":
        heads = f"{m['heads']} heads sharing one cached latent of {m['kv_elements_per_layer']}"
    moe = f", {m['experts']} experts (top-{m['experts_per_token']})" if m["experts"] else ""
    swa = (
        f", {m['sliding_window_layers']} sliding-window layers"
        if m["sliding_window_layers"]
        else ""
    )
    active = _count(m["active_params_per_token"])
    lines = [
        f"model     {model} ({m['type']}, {m['layers']} layers, {m['attention']}: "
        f"{heads}{moe}{swa})",
        f"params    {_count(m['params'])} ({active} active per token)",
        f"weights   {_gib(w['bytes'])} ({w['source']})",
        f"KV cache  {_kib(kv['bytes_per_token'])} per token ({kv['dtype_bytes']:g} bytes/element), "
        f"{_gib(kv['bytes_per_sequence'])} per {kv['context']:,}-token sequence",
        f"GPU       {g['name']}: {_gib(g['memory_bytes'])}, {g['bandwidth_tb_s']} TB/s, "
        f"gpu_memory_utilization {result['allowances']['gpu_memory_utilization']}",
        "",
    ]
    head = ("tp", "pp", "GPUs", "weights/GPU", "overhead/GPU", "KV/GPU", "KV tokens",
            f"seqs@{kv['context']}", "replicas", "total GPUs", "decode tok/s (total)",
            "tok/s/seq")  # fmt: skip
    rows = [head]
    for r in result["layouts"]:
        d = r["decode_tokens_per_s"]
        rows.append((
            str(r["tp"]), str(r["pp"]), str(r["gpus"]), f"{r['weights_gib_per_gpu']:.2f}",
            f"{r['overhead_gib_per_gpu']:.2f}", f"{r['kv_cache_gib_per_gpu']:.2f}",
            f"{r['kv_cache_tokens']:,}", str(r["sequences"]),
            str(r["replicas"]) if r["fits"] else "does not fit",
            str(r["total_gpus"] or "-"),
            f"{d['total'][0]:,}-{d['total'][1]:,}" if d else "-",
            f"{d['per_sequence'][0]:g}-{d['per_sequence'][1]:g}" if d else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(c.rjust(wd) for c, wd in zip(row, widths, strict=True)))
    lines.append("(GiB per GPU; replicas of the layout needed for --concurrency "
                 f"{result['concurrency']} sequences of {kv['context']:,} tokens)")  # fmt: skip
    best = result["recommended"]
    lines.append("")
    if best:
        lines.append(
            f"recommended: tp={best['tp']} pp={best['pp']} x {best['replicas']} replica(s) = "
            f"{best['total_gpus']} x {g['name']}, decode ~ "
            f"{best['decode_tokens_per_s']['total'][0]:,}-{best['decode_tokens_per_s']['total'][1]:,}"
            f" tokens/s in all ({best['decode_tokens_per_s']['bound']}-bound)"
        )
    else:
        lines.append("no layout up to tp=8 x pp=4 holds one sequence of this context")
    lines += [f"warning: {w}" for w in result["warnings"]]
    lines.append(f"{result['note']}; method: docs/capacity.md")
    return "\n".join(lines) + "\n"


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        directory = resolve_model(args.model, args.config)
        shape, weights = load_shape(directory)
        allowances = Allowances(
            gpu_memory_utilization=args.gpu_memory_utilization,
            cuda_graph_bytes=0 if args.enforce_eager else Allowances.cuda_graph_bytes,
        )
        result = plan(
            shape,
            weights,
            gpu(args.gpu),
            context=args.context,
            concurrency=args.concurrency,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            allowances=allowances,
            scheduler=Scheduler(
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                block_size=args.block_size,
                async_scheduling=not args.no_async_scheduling,
            ),
        )
    except PlanError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.format == "json":
        result["model"]["path"] = str(directory)
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_table(result, args.model))
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "plan",
        parents=[common],
        help="estimate GPU memory, parallel layout and throughput for a model (docs/capacity.md)",
    )
    s.add_argument(
        "--model",
        required=True,
        help="a model directory, a config.json, or a registry NAME@VERSION",
    )
    s.add_argument("--gpu", default="h100-80gb", help=f"one of: {', '.join(GPUS)}")
    s.add_argument("--context", type=int, default=8192, help="tokens per sequence (max-model-len)")
    s.add_argument("--concurrency", type=int, default=1, help="sequences served at once")
    s.add_argument(
        "--dtype",
        help="weight dtype (bf16, fp16, fp32, fp8, int8, int4); default: the checkpoint's own",
    )
    s.add_argument("--kv-dtype", default="auto", help="KV cache dtype: auto (as the model), fp8")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (no allowance)")
    s.add_argument("--max-num-batched-tokens", type=int, help="default: vLLM's for the GPU")
    s.add_argument("--max-num-seqs", type=int, help="default: vLLM's for the GPU")
    s.add_argument("--block-size", type=int, default=16, help="KV cache block (tokens)")
    s.add_argument("--no-async-scheduling", action="store_true", help="as vLLM's flag")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_plan)
