"""Measure what the Bastion gateway adds on top of an upstream, side by side with the upstream.

One run starts:

* an nginx "stub engine" (``worker_processes 1``, ``daemon off``, everything in a temp dir)
  answering ``POST /v1/chat/completions`` with a canned OpenAI chat completion on one port and
  with a canned SSE stream on a second port, plus ``GET /health`` and ``GET /v1/models``;
* optionally a second nginx as a plain keep-alive reverse proxy (``--proxy-baseline``), the
  C-level floor for one extra hop;
* the gateway (``bastion serve --config FILE``, or ``--gateway-cmd``) with a generated config
  whose models point at the stub, and an API key created with ``bastion keys create``.

Then, for each concurrency, ``wrk -t1 -cN -dD -s post.lua --latency URL`` runs against the stub
directly and through each proxy with the same ~250-byte chat request, and a table of req/s,
p50, p99, added p50 (proxy p50 - direct p50) and the req/s ratio is printed.

Standard library only; run with the project's venv python:

    .venv/bin/python bench/overhead.py --duration 5

This file is the command line and the run itself; the parts live next to it and are imported
from the script's directory (on ``sys.path`` when run as a script): ``_common`` (names, HTTP
helpers), ``_procs`` (process groups, signals), ``_payloads`` (canned responses, request body),
``_nginx`` (stub and proxy), ``_gateway`` (config, key, server), ``_wrk`` (run and parse),
``_report`` (table, JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import DIRECT, GATEWAY, NGINX_PROXY, ROOT, BenchError, http, tail
from _gateway import Gateway, start_gateway
from _nginx import start_nginx_proxy, start_stub
from _payloads import request_body
from _procs import Interrupted, Processes, signals_raise
from _report import Point, Report, fmt_ms, render_table, save_json
from _wrk import parse_wrk, run_wrk, write_lua


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Bastion gateway overhead vs. a direct nginx stub, measured with wrk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk point")
    p.add_argument(
        "--concurrency",
        default="1,8,32",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="comma-separated wrk connection counts",
    )
    p.add_argument("--stream", action="store_true", help="bench the SSE (stream=true) path")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON here")
    p.add_argument(
        "--gateway-cmd",
        metavar="CMD",
        help="command that serves the gateway instead of `bastion serve --config FILE`; "
        "placeholders {config} {host} {port} {python} {venv} {root} {bastion}; "
        "BASTION_CONFIG is also set in its environment",
    )
    p.add_argument(
        "--bastion",
        type=Path,
        default=ROOT / ".venv" / "bin" / "bastion",
        help="bastion CLI used for db upgrade / keys create / serve",
    )
    p.add_argument("--api-key", help="use this key instead of creating one (skips the CLI)")
    p.add_argument(
        "--config-template",
        type=Path,
        help="gateway config template (string.Template: $host $port $db_url $admin_key $team "
        "$model_json $model_stream $served_name $json_url $sse_url)",
    )
    p.add_argument(
        "--limits",
        choices=["none", "memory", "redis"],
        default="none",
        help="turn on limits at the key, team and cost-center levels (never refusing), with "
        "in-memory counters or the machine's Redis (127.0.0.1:6379)",
    )
    p.add_argument(
        "--audit",
        choices=["on", "off"],
        default="on",
        help="the audit trail (durable WAL before forwarding, sealed contents, hash chain)",
    )
    p.add_argument(
        "--audit-dir",
        type=Path,
        help="put the audit log here (e.g. /dev/shm, to separate the disk's flush time from "
        "the gateway's own work); default: the run's temp dir",
    )
    p.add_argument("--direct-only", action="store_true", help="bench only the nginx stub")
    p.add_argument(
        "--proxy-baseline",
        action="store_true",
        help="also bench an nginx keep-alive reverse proxy in front of the stub (one C hop)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="record failing points (non-2xx, socket errors, wrk failure) and continue",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk before each target")
    p.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk --timeout in seconds")
    p.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for health")
    p.add_argument(
        "--pin",
        metavar="WRK:SERVERS",
        help="pin wrk and the servers to CPU lists, e.g. 0:1 (wrk on CPU 0, nginx and gateway "
        "on CPU 1); unpinned, loopback latency at c=1 flips between two modes run to run",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--verbose", action="store_true", help="print raw wrk output")
    args = p.parse_args(argv)
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    if args.pin:
        try:
            wrk_cpus, server_cpus = (parse_cpus(x) for x in args.pin.split(":"))
        except ValueError:
            p.error("--pin wants WRK:SERVERS CPU lists, e.g. 0:1 or 0:1-3")
        args.pin_cpus = {"wrk": wrk_cpus, "server": server_cpus}
    else:
        args.pin_cpus = {}
    return args


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise ValueError(text)
    return cpus


def check_tools() -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: apt-get install -y nginx-light wrk (Debian)"
        )


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def check_response(name: str, url: str, body: str, key: str | None, stream: bool) -> str:
    """Send one request and check the answer's status and shape; returns its content type."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        status, resp_headers, data = http("POST", url, body.encode(), headers, timeout=10)
    except OSError as exc:
        raise BenchError(f"{name}: request to {url} failed: {exc}") from exc
    text = data.decode(errors="replace")
    if not 200 <= status < 300:
        raise BenchError(f"{name}: {url} answered HTTP {status}:\n{text[:2000]}")
    ctype = str(resp_headers.get("content-type", ""))
    if stream:
        if "text/event-stream" not in ctype or "data: [DONE]" not in text:
            raise BenchError(f"{name}: expected an SSE stream, got {ctype!r}:\n{text[:2000]}")
    else:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise BenchError(f"{name}: body is not JSON:\n{text[:2000]}") from exc
        if doc.get("object") != "chat.completion" or "choices" not in doc:
            raise BenchError(f"{name}: not a chat completion:\n{text[:2000]}")
    return ctype


def warm_up(
    args: argparse.Namespace,
    procs: Processes,
    work: Path,
    targets: Sequence[tuple[str, str]],
    script: Path,
) -> None:
    """A short wrk run per target; errors through a proxy fail the run unless --keep-going."""
    for name, url in targets:
        out = run_wrk(procs, work, url, script, 8, args.warmup, args.wrk_timeout)
        stats = parse_wrk(out)
        if stats.errors and name != DIRECT:
            msg = f"{name}: warm-up had {stats.non_2xx} non-2xx, {stats.socket_errors}"
            if not args.keep_going:
                raise BenchError(f"{msg}\n{out}")
            print(f"# WARNING {msg}", flush=True)


def measure(
    point: Point,
    args: argparse.Namespace,
    procs: Processes,
    work: Path,
    script: Path,
    gateway: Gateway | None,
) -> None:
    """Fill in ``point`` from one wrk run; a failed point raises unless --keep-going."""
    name, conc = point.target, point.concurrency
    try:
        point.raw = run_wrk(procs, work, point.url, script, conc, args.duration, args.wrk_timeout)
        point.stats = parse_wrk(point.raw)
    except (BenchError, ValueError) as exc:
        point.error = str(exc)
    else:
        s = point.stats
        if s.requests == 0:
            point.error = "wrk completed no requests"
        elif s.errors:
            point.error = (
                f"{s.non_2xx} non-2xx responses, socket errors {s.socket_errors} "
                f"of {s.requests} requests"
            )
    if args.verbose:
        print(point.raw, flush=True)
    status = (
        f"{point.stats.requests_per_sec:,.0f} req/s  p50 {fmt_ms(point.stats.p50_ms)}"
        if point.stats
        else "no result"
    )
    print(f"# {name:<11} c={conc:<3} {status}", flush=True)
    if point.error:
        detail = point.error
        if name == GATEWAY and gateway is not None:
            detail += f"\n--- gateway log tail ---\n{tail(gateway.log)}"
        if not args.keep_going:
            raise BenchError(f"{name} c={conc}: {detail}\n{point.raw}")
        print(f"# ERROR {name} c={conc}: {detail}", flush=True)


def bench(args: argparse.Namespace, procs: Processes, work: Path, report: Report) -> None:
    check_tools()
    report.env.update(
        cpus=os.cpu_count(),
        nginx=tool_version(["nginx", "-v"]),
        wrk=tool_version(["wrk", "--version"]),
        python=sys.version.split()[0],
        uname=" ".join(os.uname()),
    )
    body = request_body(args.stream)
    print(f"# request body: {len(body.encode())} bytes, stream={args.stream}", flush=True)

    stub = start_stub(procs, work, args.startup_timeout)
    stub_url = stub.sse_url if args.stream else stub.json_url
    print(f"# nginx stub: json {stub.json_url}  sse {stub.sse_url}", flush=True)

    gateway: Gateway | None = None
    if not args.direct_only:
        gateway = start_gateway(procs, work, stub, args)
        report.env["gateway_cmd"] = shlex.join(gateway.argv)
        print(f"# gateway: {shlex.join(gateway.argv)} at {gateway.url}", flush=True)
    # Every target gets the same request, with the gateway's key when there is a gateway.
    key = gateway.key if gateway else None
    path = "/v1/chat/completions"
    targets = [(DIRECT, f"{stub_url}{path}")]
    if args.proxy_baseline:
        proxy = start_nginx_proxy(procs, work, stub_url, args.startup_timeout)
        targets.append((NGINX_PROXY, f"{proxy}{path}"))
    if gateway:
        targets.append((GATEWAY, f"{gateway.url}{path}"))

    for name, url in targets:
        ctype = check_response(name, url, body, key, args.stream)
        print(f"# {name}: {url} -> 200 {ctype}", flush=True)
    script = write_lua(work, body, key)

    if args.warmup > 0:
        warm_up(args, procs, work, targets, script)

    for conc in args.concurrency:
        for name, url in targets:
            point = Point(target=name, concurrency=conc, url=url)
            report.points.append(point)
            measure(point, args, procs, work, script, gateway)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes(args.pin_cpus)
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    report = Report(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        args={
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "pin_cpus"
        },
        env={},
    )
    rc = 0
    with signals_raise():
        try:
            bench(args, procs, work, report)
        except BenchError as exc:
            print(f"bench/overhead.py: {exc}", file=sys.stderr)
            rc = 1
        except (Interrupted, KeyboardInterrupt) as exc:
            print(f"bench/overhead.py: interrupted ({exc})", file=sys.stderr)
            rc = 130
        finally:
            procs.stop_all()
            if args.keep_tmp or rc:
                print(f"# temp dir kept: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    if report.points:
        print()
        print(f"wrk -t1, {args.duration:g}s per point, {'SSE' if args.stream else 'JSON'} path")
        print(render_table(report.points))
        if args.json:
            save_json(args.json, report)
            print(f"# results written to {args.json}")
        if any(p.error for p in report.points):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
