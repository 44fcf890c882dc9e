"""What Bastion adds to a stream: time to the first content byte, and each chunk's relay latency,
straight from the upstream and through Bastion, side by side in one run.

The upstream is `bench/stream_stub.py`, a paced SSE engine: one chunk every `--interval-ms`,
each stamped with the moment it was written (CLOCK_MONOTONIC, shared by every process on the
host). The client, one stream at a time, alternating direct and Bastion, records:

* TTFB: from sending the request to the first byte of the first non-empty content delta;
* relay latency: for every stamped chunk, arrival minus stamp, i.e. what sat between the
  engine's write and the client (the network, and through Bastion, the whole relay);
* with `--interval-ms 0` (every chunk written at once) the per-chunk time is the relay's CPU
  cost per chunk: (last arrival - first arrival) / chunks.

Then, with the streams done, the host's own floors (`idle_floors`): the waits Bastion adds to
a stream's start, each measured alone after the same idle gap, so that the added TTFB can be
read against what the disk, Redis and one more hop cost on this host by themselves.

`--engine URL --engine-model NAME` measures TTFB against a real engine instead (a vLLM serving
the tiny model, say): the added TTFB is the same request-path cost, with a real engine's
jitter around it. Standard library only, from the repository root:

    python3 -m bench.streaming --pg 127.0.0.1 --limits redis --audit on
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

from bench.report import alternating
from bench.stub import CHAT_PATH, MODEL_STREAM, Processes, Stub, free_port, wait_ready
from bench.targets import CACHE, ROOT, Bastion, drop_databases, install_baseline, start_gateway


def stream_once(url: str, key: str | None, body: bytes) -> tuple[float, list[float], float]:
    """(TTFB s, relay latencies s of the stamped chunks, last arrival - first arrival s)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    started = time.monotonic()
    conn.request("POST", u.path, body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    ttfb: float | None = None
    latencies: list[float] = []
    arrivals: list[float] = []
    buf = b""
    while chunk := resp.read1(65536):
        now = time.monotonic()
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]" or not data.startswith(b"{"):
                continue
            for choice in json.loads(data).get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if not text:
                    continue
                ttfb = now - started if ttfb is None else ttfb
                arrivals.append(now)
                if text.startswith("t="):
                    latencies.append(now - float(text[2:].split()[0]))
    conn.close()
    if ttfb is None:
        raise SystemExit(f"{url}: no content in the stream")
    return ttfb, latencies, arrivals[-1] - arrivals[0]


def idle_floors(
    upstream: str, wal_dir: Path, redis: bool, gap: float, samples: int
) -> dict[str, list[float]]:
    """What the host itself charges for the waits Bastion adds to a stream's start, each taken
    after `gap` seconds of idling (as the gateway idles between streams), in ms: a 1 KiB append
    + fdatasync where the audit log lives (the request entry is durable before forwarding), a
    Redis round trip (admission), and one more HTTP round trip to the upstream (the extra hop)."""
    u = urlsplit(upstream)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    red = socket.create_connection(("127.0.0.1", 6379), timeout=10) if redis else None
    path = wal_dir / "floor-probe.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out: dict[str, list[float]] = {
        "disk flush": [],
        "Redis round trip": [],
        "upstream round trip": [],
    }
    try:
        for _ in range(samples):
            time.sleep(gap)
            t = time.perf_counter()
            os.write(fd, b"x" * 1023 + b"\n")
            os.fdatasync(fd)
            out["disk flush"].append((time.perf_counter() - t) * 1000)
            if red is not None:
                time.sleep(gap)
                t = time.perf_counter()
                red.sendall(b"PING\r\n")
                if red.recv(64) != b"+PONG\r\n":
                    raise SystemExit("Redis did not answer PING")
                out["Redis round trip"].append((time.perf_counter() - t) * 1000)
            time.sleep(gap)
            t = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            out["upstream round trip"].append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        conn.close()
        if red is not None:
            red.close()
    return {k: v for k, v in out.items() if v}


def request(model: str, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Count slowly from one to twenty."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.streaming", description=__doc__)
    p.add_argument("--streams", type=int, default=45, help="streams per target")
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of streams not counted (the gateway's writer processes start meanwhile)",
    )
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--interval-ms", type=float, default=10.0, help="0: every chunk at once")
    p.add_argument("--engine", help="a real engine's base URL instead of the paced stub")
    p.add_argument("--engine-model", help="the engine's served model name")
    p.add_argument("--pg", metavar="HOST", help="Bastion's store in PostgreSQL on HOST")
    p.add_argument("--limits", choices=["none", "memory", "redis"], default="none")
    p.add_argument("--limit-levels", choices=["all", "key"], default="all")
    p.add_argument("--audit", choices=["on", "off"], default="on")
    p.add_argument("--audit-dir", type=Path)
    p.add_argument("--bastion", type=Path, default=ROOT / ".venv" / "bin" / "bastion")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument(
        "--baseline-ref",
        metavar="GITREF",
        help="also this commit of the repository, run from this tree's venv (its exported "
        "source on PYTHONPATH: the same dependencies), same config",
    )
    p.add_argument(
        "--floor-samples",
        type=int,
        default=30,
        help="host floors measured after the streams (0: none), see idle_floors",
    )
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    if args.engine and not args.engine_model:
        p.error("--engine needs --engine-model")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-stream-"))
    try:
        if args.engine:
            upstream, served = args.engine.rstrip("/"), args.engine_model
        else:
            port = free_port()
            stub_cmd = [sys.executable, "-m", "bench.stream_stub", "--port", str(port)]
            stub_cmd += ["--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)]
            procs.start("stream-stub", stub_cmd, work / "stub.log")
            upstream, served = f"http://127.0.0.1:{port}", "stub-model"
            wait_ready(upstream + "/health", procs.last(), work / "stub.log", "stub", 30)
        gw_args = SimpleNamespace(
            config_template=None,
            limits=args.limits,
            limit_levels=args.limit_levels,
            audit=args.audit,
            audit_dir=args.audit_dir,
            pg=args.pg,
            gateway_cmd=None,
            startup_timeout=args.startup_timeout,
        )
        bastion = Bastion("bastion", args.bastion, ROOT)
        versions = [bastion]
        if args.baseline_ref:
            versions.append(install_baseline(args.baseline_ref, CACHE, bastion)[0])
        runs = {"direct": (upstream + CHAT_PATH, None, request(served, args.chunks))}
        for version in versions:
            gateway = start_gateway(procs, work, Stub(upstream, upstream), version, gw_args, None)
            runs[version.label] = (gateway.url, gateway.key, request(MODEL_STREAM, args.chunks))
        warm_until = time.monotonic() + args.warmup
        while time.monotonic() < warm_until:
            for url, key, body in runs.values():
                stream_once(url, key, body)
        results: dict[str, list[tuple[float, list[float], float]]] = {n: [] for n in runs}
        for i in range(args.streams):
            for name in alternating(list(runs), i):
                url, key, body = runs[name]
                results[name].append(stream_once(url, key, body))
        floors = {}
        if args.floor_samples:
            gap = statistics.median(r[0] + r[2] for r in results["direct"])  # a stream
            log_fs = args.audit_dir or work  # the filesystem the gateway's audit log is on
            floors = idle_floors(upstream, log_fs, args.limits == "redis", gap, args.floor_samples)
            floors["idle gap"] = [gap * 1000]
        report(args, results, floors)
    finally:
        procs.stop_all()
        drop_databases()
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace, results: dict[str, list], floors: dict[str, list[float]]
) -> None:
    rows = {}
    for name, runs in results.items():
        ttfb = [r[0] * 1000 for r in runs]
        lat = [x * 1000 for r in runs for x in r[1]]
        spread = [r[2] * 1000 / max(1, args.chunks - 1) for r in runs]
        rows[name] = (ttfb, lat, spread)
    up = (
        f"real engine {args.engine}"
        if args.engine
        else (f"paced stub, {args.chunks} chunks every {args.interval_ms:g} ms")
    )
    print(f"\n{args.streams} streams per target, one at a time, interleaved; upstream: {up}")
    print(
        f"Bastion: audit {args.audit}, limits {args.limits}, store "
        f"{'PostgreSQL' if args.pg else 'SQLite'}\n"
    )
    print("| target | TTFB p50 | TTFB p90 | chunk relay latency p50 | p90 | time per chunk p50 |")
    print("|---|---|---|---|---|---|")
    for name, (ttfb, lat, spread) in rows.items():
        lat_50 = f"{pct(lat, 50):.3f} ms" if lat else "-"
        lat_90 = f"{pct(lat, 90):.3f} ms" if lat else "-"
        print(
            f"| {name} | {pct(ttfb, 50):.3f} ms | {pct(ttfb, 90):.3f} ms | {lat_50} | {lat_90} "
            f"| {pct(spread, 50):.3f} ms |"
        )
    d = rows["direct"]
    for name, b in rows.items():
        if name == "direct":
            continue
        print(f"\n{name}: added TTFB p50 {pct(b[0], 50) - pct(d[0], 50):+.3f} ms", end="")
        if d[1] and b[1]:
            added = pct(b[1], 50) - pct(d[1], 50)
            print(f"; added relay latency per chunk p50 {added:+.3f} ms", end="")
        print(f"; added time per chunk p50 {pct(b[2], 50) - pct(d[2], 50):+.3f} ms", end="")
    print()
    if floors:
        gap = floors.pop("idle gap")[0]
        print(f"\nThe host's own waits, each after {gap:.0f} ms idle (as between streams):")
        print("| wait | p50 | p90 |\n|---|---|---|")
        for name, values in floors.items():
            print(f"| {name} | {pct(values, 50):.3f} ms | {pct(values, 90):.3f} ms |")


if __name__ == "__main__":
    sys.exit(main())
