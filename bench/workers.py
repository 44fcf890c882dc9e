"""Throughput of ``bastion serve --workers N`` for several N against the nginx stub, every
feature on (audit trail, limits in Redis), next to nginx as a reverse proxy and LiteLLM.

One ``bench.overhead`` run per N (each starts the stub, the gateway with ``--gateway-cmd
"{bastion} serve --config {config} --port {port} --workers N"`` and, in the first run, the
nginx proxy and LiteLLM when asked), then one table: req/s and p50/p99 per target and
concurrency. Redis on 127.0.0.1:6379 is required (N > 1 refuses in-memory limits).

Standard library only; from the repository root:

    python3 -m bench.workers --workers 1,2,4 --duration 5 --concurrency 8,32,64 \
        --proxy-baseline --litellm --pg 127.0.0.1 --bastion /path/to/.venv/bin/bastion
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.stub import GATEWAY


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk point")
    p.add_argument("--concurrency", default="8,32,64", help="comma-separated wrk connections")
    p.add_argument("--proxy-baseline", action="store_true", help="add the nginx reverse proxy")
    p.add_argument("--litellm", action="store_true", help="add the LiteLLM proxy (1 worker)")
    p.add_argument("--bastion", help="bastion CLI to run (default: bench.overhead's)")
    p.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds of wrk before each target: /healthz answers once worker 0 serves, and "
        "the others start after it, so the warm-up must outlast their start",
    )
    p.add_argument("--json", type=Path, help="write every point here as JSON")
    p.add_argument("--stream", action="store_true", help="the SSE path instead of JSON")
    p.add_argument(
        "--pg",
        metavar="HOST",
        help="store in PostgreSQL on HOST (user postgres, trust auth; a fresh database per "
        "run, dropped after) instead of SQLite, which N processes share badly",
    )
    args = p.parse_args(argv)
    args.worker_counts = [int(x) for x in args.workers.split(",") if x.strip()]
    if not args.worker_counts or min(args.worker_counts) < 1:
        p.error("--workers needs positive integers")
    return args


def run_one(args: argparse.Namespace, workers: int, first: bool, out: Path) -> list[dict]:
    """One bench.overhead run with `workers` gateway processes; its points, the gateway's
    relabelled `bastion wN`."""
    cmd = [
        sys.executable,
        "-m",
        "bench.overhead",
        "--duration",
        str(args.duration),
        "--concurrency",
        args.concurrency,
        "--limits",
        "redis",
        "--audit",
        "on",
        "--json",
        str(out),
        "--gateway-cmd",
        f"{{bastion}} serve --config {{config}} --port {{port}} --workers {workers}",
        "--startup-timeout",
        str(60 + 30 * workers),
        "--warmup",
        str(args.warmup),
        "--keep-going",  # a point that fails (LiteLLM timing out at high concurrency) is shown
        *(["--pg", args.pg] if args.pg else []),
    ]
    if args.bastion:
        cmd += ["--bastion", args.bastion]
    if args.stream:
        cmd.append("--stream")
    if first and args.proxy_baseline:
        cmd.append("--proxy-baseline")
    if first and args.litellm:
        cmd.append("--litellm")
    print(f"# workers={workers}: {' '.join(cmd)}", flush=True)
    # Non-zero also when a point failed (kept with --keep-going); no JSON means it broke.
    subprocess.run(cmd, check=False, env=os.environ)
    if not out.exists():
        raise SystemExit(f"bench.overhead wrote no results for --workers {workers}")
    points = json.loads(out.read_text())["points"]
    for p in points:
        if p["target"] == GATEWAY:
            p["target"] = f"bastion w{workers}"
    # The stub's own figures from the first run only: one direct row is enough.
    return [p for p in points if first or p["target"].startswith("bastion w")]


def render(points: list[dict], concurrencies: list[int]) -> str:
    """One row per target, req/s (p50 / p99) per concurrency."""
    targets = list(dict.fromkeys(p["target"] for p in points))
    header = ["target", *(f"c={c} req/s (p50 / p99)" for c in concurrencies)]
    rows = []
    for t in targets:
        row = [t]
        for c in concurrencies:
            p = next((p for p in points if p["target"] == t and p["concurrency"] == c), None)
            s = p and p.get("stats")
            if not s:
                row.append("-")
                continue
            pct = s["percentiles_ms"]
            row.append(f"{s['requests_per_sec']:,.0f} ({pct['50']:.1f} / {pct['99']:.1f} ms)")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-workers-"))
    points: list[dict] = []
    for i, n in enumerate(args.worker_counts):
        points += run_one(args, n, i == 0, work / f"w{n}.json")
    concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
    store = "PostgreSQL" if args.pg else "SQLite"
    print(f"\n# {os.cpu_count()} CPUs; every gateway: audit on, limits in Redis, {store}\n")
    print(render(points, concurrencies))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(points, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
