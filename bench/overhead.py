"""Measure what the Bastion gateway adds on top of an upstream, side by side with the upstream.

One run starts (see ``bench/stub.py`` and ``bench/targets.py``):

* an nginx "stub engine" answering ``POST /v1/chat/completions`` with a canned vLLM-style chat
  completion on one port and a canned SSE stream on another;
* optionally nginx as a plain keep-alive reverse proxy (``--proxy-baseline``), the C floor for
  one extra hop;
* the gateway of this tree (``bastion serve``, or ``--gateway-cmd``), its models pointing at
  the stub, with an API key made by ``bastion keys create``;
* optionally another version of Bastion (``--baseline-ref GITREF``) with the same config on
  another port, and the LiteLLM proxy routed to the same stub (``--litellm``).

Each target is checked with one request (status and body), warmed up, and then, for each
concurrency N in turn against every target: ``wrk -t1 -cN -dD -s post.lua --latency URL`` with
the same ~250-byte chat request. The table shows req/s, p50, p99, added p50 (target p50 -
direct p50 at the same N), the req/s ratio to direct, the CPU time the target's server
process(es) used per request during the run (cpu/req) and, with a baseline, this tree's req/s
and cpu/req over the baseline's.

Standard library only; from the repository root:

    python3 -m bench.overhead --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.report import (
    Point,
    Report,
    alternating,
    baseline_summary,
    fmt_ms,
    fmt_us,
    render_table,
    save_json,
)
from bench.stub import (
    CHAT_PATH,
    CONTENT,
    DIRECT,
    GATEWAY,
    BenchError,
    Interrupted,
    Processes,
    Target,
    http,
    request_body,
    session_cpu_s,
    signals_raise,
    start_nginx_proxy,
    start_stub,
    tail,
)
from bench.targets import (
    CACHE,
    LITELLM_VERSION,
    ROOT,
    Bastion,
    drop_databases,
    install_baseline,
    start_gateway,
    start_litellm,
)
from bench.wrk import parse_wrk, run_wrk, write_lua


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead",
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
        "placeholders {config} {host} {port} {python} {venv} {root} {bastion} (of the version "
        "being served); BASTION_CONFIG is also set in its environment",
    )
    p.add_argument(
        "--bastion",
        type=Path,
        default=ROOT / ".venv" / "bin" / "bastion",
        help="bastion CLI of this tree, used for db upgrade / keys create / serve",
    )
    p.add_argument("--api-key", help="use this key for this tree's gateway instead of creating one")
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
        "--limit-levels",
        choices=["all", "key"],
        default="all",
        help="with --limits: rpm, tpm, concurrency and budgets at the key, team and "
        "cost-center levels (all, 7 counters), or the key's rpm and tpm only (key)",
    )
    p.add_argument(
        "--pg",
        metavar="HOST",
        help="store in PostgreSQL on HOST (user postgres, trust auth): a fresh database per "
        "gateway, dropped after, and a shared key set from `bastion secrets init`",
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
        help="put each gateway's audit log in a folder under this one (e.g. /dev/shm/x, to "
        "separate the disk's flush time from the gateway's own work); default: the temp dir",
    )
    p.add_argument(
        "--baseline-ref",
        metavar="GITREF",
        help="also bench this commit of the repository as target bastion@GITREF: exported and "
        "installed into a venv cached under CACHE_DIR/bench-baseline/<commit>, same config",
    )
    p.add_argument(
        "--baseline-same-venv",
        action="store_true",
        help="run the baseline from this tree's venv, importing its exported source "
        "(PYTHONPATH): the same dependencies exactly, and no install",
    )
    p.add_argument(
        "--litellm",
        action="store_true",
        help=f"also bench the LiteLLM {LITELLM_VERSION} proxy (1 worker, no database, no "
        "Redis), installed into CACHE_DIR/bench-litellm-venv on first use",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE,
        help="where the baseline and LiteLLM venvs are kept",
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
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every point this many times, the gateways' order reversed each round "
        "(a target measured right after another runs a few %% differently), with the median "
        "ratio against --baseline-ref printed",
    )
    p.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk --timeout in seconds")
    p.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for health")
    p.add_argument(
        "--pin",
        metavar="WRK:SERVERS",
        help="pin wrk and the servers to CPU lists, e.g. 0:1 (wrk on CPU 0, nginx and the "
        "proxies on CPU 1); unpinned, loopback latency at c=1 flips between two modes",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--verbose", action="store_true", help="print raw wrk output")
    args = p.parse_args(argv)
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    if args.direct_only and (args.litellm or args.baseline_ref):
        p.error("--direct-only excludes --litellm and --baseline-ref")
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


# -- the run ------------------------------------------------------------------------------------
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
            print(f"bench.overhead: {exc}", file=sys.stderr)
            rc = 1
        except (Interrupted, KeyboardInterrupt) as exc:
            print(f"bench.overhead: interrupted ({exc})", file=sys.stderr)
            rc = 130
        finally:
            procs.stop_all()
            drop_databases()
            if args.keep_tmp or rc:
                print(f"# temp dir kept: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    if report.points:
        print()
        title = f"wrk -t1, {args.duration:g}s per point, {'SSE' if args.stream else 'JSON'} path"
        if "baseline_commit" in report.env:
            title += f"; bastion@{args.baseline_ref} = {report.env['baseline_commit'][:12]}"
        print(title)
        print(render_table(report.points))
        for line in baseline_summary(report.points):
            print(line)
        if args.json:
            save_json(args.json, report)
            print(f"# results written to {args.json}")
        if any(p.error for p in report.points):
            rc = 1
    return rc


def bench(args: argparse.Namespace, procs: Processes, work: Path, report: Report) -> None:
    check_tools()
    report.env.update(
        cpus=os.cpu_count(),
        nginx=tool_version(["nginx", "-v"]),
        wrk=tool_version(["wrk", "--version"]),
        python=sys.version.split()[0],
        uname=" ".join(os.uname()),
        commit=tool_version(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        targets={},
    )
    # Installs first (minutes on first use), so that no server idles meanwhile.
    baseline: Bastion | None = None
    if args.baseline_ref:
        this = Bastion(GATEWAY, args.bastion, ROOT) if args.baseline_same_venv else None
        baseline, sha = install_baseline(args.baseline_ref, args.cache_dir, this)
        report.env["baseline_commit"] = sha
        print(f"# {baseline.label}: commit {sha}, {baseline.cli}", flush=True)

    body = request_body(args.stream)
    print(f"# request body: {len(body.encode())} bytes, stream={args.stream}", flush=True)
    stub = start_stub(procs, work, args.startup_timeout)
    stub_url = stub.sse_url if args.stream else stub.json_url
    print(f"# nginx stub: json {stub.json_url}  sse {stub.sse_url}", flush=True)

    targets = [Target(DIRECT, stub_url + CHAT_PATH)]
    if args.proxy_baseline:
        targets.append(start_nginx_proxy(procs, work, stub_url, args.startup_timeout))
    key: str | None = None
    if not args.direct_only:
        current = Bastion(GATEWAY, args.bastion, ROOT)
        gateway = start_gateway(procs, work, stub, current, args, args.api_key)
        targets.append(gateway)
        key = gateway.key
    if baseline is not None:
        targets.append(start_gateway(procs, work, stub, baseline, args, None))
    if args.litellm:
        # A master key of LiteLLM's form ("sk-…") as long as this tree's key: the same request
        # size for every target.
        master_key = "sk-" + secrets.token_hex(64)[: max(len(key or "") - 3, 32)]
        litellm = start_litellm(procs, work, stub, master_key, args.cache_dir, args.startup_timeout)
        litellm.info["version"] = LITELLM_VERSION
        targets.append(litellm)
    # The stub ignores the key; send it anyway, so that every target gets a request of one size.
    targets[0].key = key
    if args.proxy_baseline:
        targets[1].key = key

    for t in targets:
        ctype = check_response(t, body, args.stream)
        print(f"# {t.name}: {t.url} -> 200 {ctype}, body checked", flush=True)
        report.env["targets"][t.name] = {"url": t.url, **t.info}
    scripts = {t.name: write_lua(work, body, t.key, t.name) for t in targets}
    if args.warmup > 0:
        for t in targets:
            warm_up(args, procs, work, t, scripts[t.name])
    # Interleaved: every target at one concurrency, then the next concurrency.
    for r in range(args.rounds):
        for conc in args.concurrency:
            for t in alternating(targets, r):
                point = Point(target=t.name, concurrency=conc, url=t.url, round=r)
                report.points.append(point)
                measure(point, args, procs, work, scripts[t.name], t)


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


def check_response(t: Target, body: str, stream: bool) -> str:
    """Send one request and check the status, the shape and the stub's answer text in it;
    returns the content type."""
    headers = {"Content-Type": "application/json"}
    if t.key:
        headers["Authorization"] = f"Bearer {t.key}"
    try:
        status, resp_headers, data = http("POST", t.url, body.encode(), headers, timeout=30)
    except OSError as exc:
        raise BenchError(f"{t.name}: request to {t.url} failed: {exc}") from exc
    text = data.decode(errors="replace")
    if not 200 <= status < 300:
        raise BenchError(f"{t.name}: {t.url} answered HTTP {status}:\n{text[:2000]}")
    ctype = str(resp_headers.get("content-type", ""))
    try:
        if stream:
            if "text/event-stream" not in ctype or "data: [DONE]" not in text:
                raise ValueError(f"expected an SSE stream ending in [DONE], got {ctype!r}")
            events = [
                json.loads(line[len("data:") :])
                for line in text.splitlines()
                if line.startswith("data:") and line.strip() != "data: [DONE]"
            ]
            answer = "".join(
                c["delta"].get("content") or "" for e in events for c in e.get("choices", [])
            )
        else:
            doc = json.loads(text)
            if doc.get("object") != "chat.completion":
                raise ValueError("not a chat completion")
            answer = doc["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BenchError(f"{t.name}: unexpected answer ({exc}):\n{text[:2000]}") from exc
    if answer != "".join(CONTENT):
        raise BenchError(f"{t.name}: answer is not the stub's ({answer!r}):\n{text[:2000]}")
    return ctype


def warm_up(
    args: argparse.Namespace, procs: Processes, work: Path, t: Target, script: Path
) -> None:
    """A short wrk run; errors through a proxy fail the run unless --keep-going."""
    out = run_wrk(procs, work, t.url, script, 8, args.warmup, args.wrk_timeout)
    stats = parse_wrk(out)
    if stats.errors and t.name != DIRECT:
        msg = f"{t.name}: warm-up had {stats.non_2xx} non-2xx, {stats.socket_errors}"
        if not args.keep_going:
            raise BenchError(f"{msg}\n{out}")
        print(f"# WARNING {msg}", flush=True)


def measure(
    point: Point,
    args: argparse.Namespace,
    procs: Processes,
    work: Path,
    script: Path,
    t: Target,
) -> None:
    """Fill in ``point`` from one wrk run; a failed point raises unless --keep-going."""
    name, conc = point.target, point.concurrency
    try:
        cpu0 = session_cpu_s(t.pid) if t.pid else 0.0
        point.raw = run_wrk(procs, work, point.url, script, conc, args.duration, args.wrk_timeout)
        if t.pid:
            point.cpu_s = session_cpu_s(t.pid) - cpu0
        point.stats = parse_wrk(point.raw)
    except (BenchError, ValueError) as exc:
        point.error = str(exc)
    else:
        s = point.stats
        if point.cpu_s is not None and s.requests:
            point.cpu_us_per_req = point.cpu_s / s.requests * 1e6
        if s.requests == 0:
            point.error = "wrk completed no requests"
        elif s.errors:
            point.error = (
                f"{s.non_2xx} non-2xx responses, socket errors {s.socket_errors} "
                f"of {s.requests} requests"
            )
    if args.verbose:
        print(point.raw, flush=True)
    status = "no result"
    if point.stats:
        status = f"{point.stats.requests_per_sec:,.0f} req/s  p50 {fmt_ms(point.stats.p50_ms)}"
    if point.cpu_us_per_req is not None:
        status += f"  cpu/req {fmt_us(point.cpu_us_per_req)}"
    print(f"# {name:<14} c={conc:<3} {status}", flush=True)
    if point.error:
        detail = point.error
        if t.log is not None:
            detail += f"\n--- {name} log tail ---\n{tail(t.log)}"
        if not args.keep_going:
            raise BenchError(f"{name} c={conc}: {detail}\n{point.raw}")
        print(f"# ERROR {name} c={conc}: {detail}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
