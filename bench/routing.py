"""How much prefix cache each routing mode earns, on real vLLM CPU replicas (issue 12).

One run starts N real vLLM replicas of the tiny model with a deliberately small KV cache
(`--block-size 32 --num-gpu-blocks-override B`, `VLLM_SERVER_DEV_MODE=1` for
`POST /reset_prefix_cache`) and one Bastion gateway with two aliases over them:
`least-outstanding`, `affinity` and `precise` (the engines publish their KV-cache events). The
same workload (G groups, each a shared system prompt of
≥ 512 tokens, distinct user suffixes, Poisson arrivals, fixed seed) is played against:

- round-robin: the client sends straight to the replicas in turn (no gateway);
- least-outstanding: through Bastion, `routing.mode: least-outstanding`;
- affinity: through Bastion, `routing.mode: affinity` (the default);
- precise: through Bastion, `routing.mode: precise` (the engines' KV-cache events);
- pinned (the ideal): the client sends each group straight to one replica (group i → i mod N).

Caches are reset before each mode. Reported per mode: the share of prompt tokens read from
cache (usage `prompt_tokens_details.cached_tokens`), max/mean of the replicas' time-averaged
in-flight requests (sampled from the engines' own `vllm:num_requests_running` + `_waiting`),
TTFT p50/p95 (streamed), throughput, and requests per replica. Run from the repository root:

    .venv/bin/python -m bench.routing --groups 12 --requests 120 --rate 5 --gpu-blocks 240
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bastion.local.launcher import EngineSpec, VllmProcess, ensure_tiny_model, free_port

SERVED = "tiny-chat"
ADMIN = "bench-admin-key-0123456789abcdef"
WORDS = tuple(
    [
        "account",
        "balance",
        "transfer",
        "ledger",
        "interest",
        "mortgage",
        "deposit",
        "credit",
        "debit",
        "statement",
        "branch",
        "currency",
        "exchange",
        "settlement",
        "clearing",
        "custody",
        "bond",
        "equity",
        "option",
        "swap",
        "margin",
        "collateral",
        "audit",
        "compliance",
        "policy",
        "limit",
        "budget",
        "treasury",
        "payment",
        "invoice",
        "customer",
        "portfolio",
        "risk",
    ]
)


@dataclass
class Result:
    mode: str
    prompt: int = 0
    cached: int = 0
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    load: dict[str, float] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        loads = list(self.load.values())
        mean = statistics.fmean(loads) if loads else 0.0
        q = statistics.quantiles(self.ttft, n=20) if len(self.ttft) > 1 else [0.0] * 19
        return {
            "mode": self.mode,
            "cached_share": self.cached / self.prompt if self.prompt else 0.0,
            "max_mean_load": max(loads) / mean if mean else 0.0,
            "ttft_p50_ms": statistics.median(self.ttft) * 1000 if self.ttft else 0.0,
            "ttft_p95_ms": q[18] * 1000,
            "req_per_s": len(self.ttft) / self.seconds if self.seconds else 0.0,
            "errors": self.errors,
            "prompt_tokens_per_request": round(self.prompt / max(1, len(self.ttft))),
            "per_replica": self.sent,
            "avg_in_flight": {k: round(v, 2) for k, v in self.load.items()},
        }


def workload(
    groups: int, requests: int, rate: float, seed: int, words: int = 560
) -> list[tuple[float, int, list]]:
    """(arrival second, group, messages): Poisson arrivals, groups drawn uniformly."""
    rng = random.Random(seed)
    systems = []
    for g in range(groups):
        policy = " ".join(rng.choice(WORDS) for _ in range(words))
        systems.append(f"Group {g} desk. Policy: {policy}")
    t, out = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        g = rng.randrange(groups)
        question = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + "?"
        out.append(
            (
                t,
                g,
                [{"role": "system", "content": systems[g]}, {"role": "user", "content": question}],
            )
        )
    return out


async def one(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    model: str,
    messages: list,
    res: Result,
) -> str | None:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    try:
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                res.errors += 1
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter() - start
                if usage := chunk.get("usage"):
                    res.prompt += usage["prompt_tokens"]
                    res.cached += (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens"
                    ) or 0
            if first is not None:
                res.ttft.append(first)
            return r.headers.get("x-request-id")
    except httpx.HTTPError:
        res.errors += 1
        return None


def engine_load(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def play(
    mode: str, work: list, engines: list[str], gateway: tuple[str, str] | None
) -> Result:
    res = Result(mode)
    samples: dict[str, list[float]] = {u: [] for u in engines}
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            for u in engines:
                with contextlib.suppress(OSError):  # too busy to answer in time: no sample
                    samples[u].append(await asyncio.to_thread(engine_load, u))
            await asyncio.sleep(0.05)

    sent: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
        task = asyncio.create_task(sampler())
        t0 = time.perf_counter()
        jobs = []
        for n, (at, g, messages) in enumerate(work):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            if gateway is not None:
                url, headers, model = gateway[0], {"authorization": f"Bearer {gateway[1]}"}, mode
                target = "gateway"
            else:
                i = n % len(engines) if mode == "round-robin" else g % len(engines)
                url, headers, model = engines[i], {}, SERVED
                target = f"replica-{i}"
            sent[target] = sent.get(target, 0) + 1
            jobs.append(asyncio.create_task(one(client, url, headers, model, messages, res)))
        await asyncio.gather(*jobs)
        res.seconds = time.perf_counter() - t0
        done.set()
        await task
    res.load = {
        f"replica-{i}": statistics.fmean(samples[u] or [0.0]) for i, u in enumerate(engines)
    }
    res.sent = sent
    return res


def routed(gw_url: str, alias: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{gw_url}/admin/routing?model={alias}", headers={"authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        rows = json.loads(r.read())
    return {r["deployment"]: r["decisions"] for r in rows}


def reset(engines: list[str]) -> None:
    for u in engines:
        req = urllib.request.Request(u + "/reset_prefix_cache", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=30).close()


#: The engines' PYTHONHASHSEED: block hashes are seeded with it, and precise mode recomputes them.
HASH_SEED = "12"


def kv_events_args(pub: int, replay: int) -> tuple[str, ...]:
    """vLLM flags for precise routing: events on a wildcard endpoint (vLLM binds it), a replay
    socket, and block hashes the gateway can recompute."""
    kv = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay}",
        "topic": "kv",
    }
    return ("--kv-events-config", json.dumps(kv), "--prefix-caching-hash-algo", "sha256_cbor")


def start_gateway(
    engines: list[str],
    load_factor: float,
    workdir: Path,
    events: list[tuple[int, int]] | None = None,
    tokenizer: Path | None = None,
) -> tuple[subprocess.Popen, str, str]:
    deps = [{"url": u, "served_name": SERVED} for u in engines]
    kv = [
        {
            **d,
            "kv_events": {
                "endpoint": f"tcp://127.0.0.1:{p}",
                "replay_endpoint": f"tcp://127.0.0.1:{r}",
            },
        }
        for d, (p, r) in zip(deps, events or [], strict=False)
    ]
    cfg = {
        "database": {"url": f"sqlite:///{workdir}/bench.db"},
        "cost_centers": {"cc": {"name": "Bench"}},
        "teams": {"bench": {"cost_center": "cc"}},
        "audit": {"enabled": False},
        "models": {
            "least-outstanding": {"deployments": deps, "routing": {"mode": "least-outstanding"}},
            "affinity": {"deployments": deps, "routing": {"load_factor": load_factor}},
        },
    }
    if kv:
        cfg["models"]["precise"] = {
            "deployments": kv,
            "tokenizer": str(tokenizer),
            "routing": {
                "mode": "precise",
                "load_factor": load_factor,
                "precise": {"hash_seed": HASH_SEED},
            },
        }
    path = workdir / "bastion.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN, "BASTION_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "bastion.cli"]
    subprocess.run(
        [*cli, "db", "upgrade", "--config", str(path)], env=env, cwd=workdir, capture_output=True
    )
    out = subprocess.run(
        [*cli, "keys", "create", "--team", "bench", "--config", str(path)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = subprocess.Popen(
        [*cli, "serve", "--config", str(path), "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=workdir,
        stdout=(workdir / "gateway.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1).close()
            return proc, url, key
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(
        f"gateway did not become ready: {(workdir / 'gateway.log').read_text()[-2000:]}"
    )


def micro(n: int = 20000) -> None:
    """The balancer's per-request cost, no engine: key + order + learn, per prompt size."""
    from bastion.core.request import ParsedRequest
    from bastion.engines.settings import DeploymentSettings
    from bastion.gateway.wire.openai import CHAT
    from bastion.routing.balancer import ModelRoute
    from bastion.routing.settings import ModelSettings

    deps = [DeploymentSettings(url=f"http://10.0.0.{i}:8000", served_name="m") for i in range(4)]
    rng = random.Random(1)
    for label, words, turns in (("chat", 300, 2), ("agent", 10000, 8)):
        route = ModelRoute.build("m", ModelSettings(deployments=deps))
        reqs = []
        for g in range(64):
            system = f"group {g} " + " ".join(rng.choice(WORDS) for _ in range(words))
            msgs = [{"role": "system", "content": system}]
            msgs += [{"role": "user", "content": f"turn {t} of {g}"} for t in range(turns)]
            reqs.append(ParsedRequest(CHAT, {"model": "m", "messages": msgs}, "m", False))
        size = len(json.dumps(reqs[0].body))
        start = time.perf_counter()
        for i in range(n):
            plan = route.plan(reqs[i % 64])
            dep, reason = plan.choices[0]
            route.served(plan, dep, reason)
        per = (time.perf_counter() - start) / n * 1e6
        print(f"{label} ({size} bytes of body): {per:.1f} µs per request (key + order + learn)")
        micro_precise(label, deps, reqs, n // 10)


def micro_precise(label: str, deps: list, reqs: list, n: int) -> None:
    """Precise mode's cost: tokens (template + tokenizer), block hashes, index look-up. Cold:
    a prompt's first request (every piece tokenized); warm: its pieces cached."""
    from bastion.routing.balancer import ModelRoute
    from bastion.routing.settings import ModelSettings

    settings = ModelSettings(
        deployments=deps, tokenizer=str(ensure_tiny_model()), routing={"mode": "precise"}
    )
    route = ModelRoute.build("m", settings)
    index = route.balancer.index  # type: ignore[attr-defined]
    index.block_size[:] = [32] * len(deps)
    index.store(0, [0])  # an index with something in it: keys are computed
    start = time.perf_counter()
    keys = [route.balancer.key(r) for r in reqs]
    cold = (time.perf_counter() - start) / len(reqs) * 1e3
    for g, k in enumerate(keys):  # each prompt cached on one replica
        index.store(g % len(deps), k.hashes[32])
    start = time.perf_counter()
    for i in range(n):
        plan = route.plan(reqs[i % len(reqs)])
        dep, reason = plan.choices[0]
        route.served(plan, dep, reason)
    warm = (time.perf_counter() - start) / n * 1e3
    blocks = len(keys[0].hashes[32])
    print(f"  precise: {blocks} blocks; cold {cold:.2f} ms, warm {warm:.2f} ms per request")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--rate", type=float, default=5.0, help="Poisson arrivals per second")
    ap.add_argument("--gpu-blocks", type=int, default=240, help="KV blocks (32 tokens) per replica")
    ap.add_argument("--load-factor", type=float, default=1.25)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument(
        "--prefix-words", type=int, default=560, help="words per shared prefix (~2.5 tokens each)"
    )
    ap.add_argument("--modes", default="round-robin,least-outstanding,affinity,precise,pinned")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--micro", action="store_true", help="only the balancer's per-request cost")
    args = ap.parse_args()
    if args.micro:
        micro()
        return 0

    model = ensure_tiny_model()
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    events = [(free_port(), free_port()) for _ in range(args.replicas)]
    procs = [
        VllmProcess(
            EngineSpec(
                model,
                SERVED,
                free_port(),
                gpu_memory_utilization=0.05,
                max_model_len=min(2048, 32 * (args.gpu_blocks - 2)),
                extra_args=(
                    "--block-size",
                    "32",
                    "--num-gpu-blocks-override",
                    str(args.gpu_blocks),
                    *kv_events_args(*events[i]),
                ),
            ),
            log_path=workdir / f"engine-{i}.log",
            env={"VLLM_SERVER_DEV_MODE": "1", "PYTHONHASHSEED": HASH_SEED},
        )
        for i in range(args.replicas)
    ]
    gw: subprocess.Popen | None = None
    rows = []
    try:
        print(f"starting {args.replicas} vLLM replicas (logs in {workdir}) ...", flush=True)
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(timeout=600)
        engines = [p.url for p in procs]
        gw, gw_url, key = start_gateway(engines, args.load_factor, workdir, events, model)
        work = workload(args.groups, args.requests, args.rate, args.seed, args.prefix_words)
        # Warm-up off the record (compiles, first-request costs), then caches are reset.
        asyncio.run(play("round-robin", work[:4], engines, None))
        for mode in args.modes.split(","):
            reset(engines)
            print(f"[{time.strftime('%H:%M:%S')}] {mode} ...", flush=True)
            via = (gw_url, key) if mode in ("least-outstanding", "affinity", "precise") else None
            row = asyncio.run(play(mode, work, engines, via)).row()
            if via is not None:  # where the gateway sent them, from its own tallies
                row["per_replica"] = routed(gw_url, mode)
            rows.append(row)
            print("   ", json.dumps(row), flush=True)
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(30)
        for p in procs:
            p.stop()
    print()
    print("| mode | cached share | max/mean in-flight | TTFT p50 | TTFT p95 | req/s | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['cached_share']:.1%} | {r['max_mean_load']:.2f} | "
            f"{r['ttft_p50_ms']:.0f} ms | {r['ttft_p95_ms']:.0f} ms | {r['req_per_s']:.2f} | "
            f"{r['errors']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
