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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.template"
PROXY_TEMPLATE = BENCH_DIR / "nginx-proxy.conf.template"
POST_LUA_TEMPLATE = BENCH_DIR / "post.lua.template"

HOST = "127.0.0.1"
SERVED_NAME = "stub-model"
MODEL_JSON = "stub"  # gateway model routed to the JSON stub
MODEL_STREAM = "stub-stream"  # gateway model routed to the SSE stub
TEAM = "bench"

DIRECT = "direct"
NGINX_PROXY = "nginx-proxy"
GATEWAY = "bastion"

# --------------------------------------------------------------------------------------------
# Canned payloads
# --------------------------------------------------------------------------------------------

CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench5f0c1d2e3a4b5c6d7e8f9a0b"


def canned_completion() -> dict[str, Any]:
    """A non-streaming chat completion as vLLM's OpenAI server returns it."""
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": SERVED_NAME,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "GPU hours rose 4 percent; storage stayed flat.",
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 41,
            "completion_tokens": 12,
            "total_tokens": 53,
            "prompt_tokens_details": {"cached_tokens": 16},
        },
        "prompt_logprobs": None,
    }


def _chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": SERVED_NAME,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def canned_stream() -> str:
    """An SSE body as vLLM streams it with ``stream_options.include_usage``."""
    events: list[dict[str, Any]] = [
        _chunk({"role": "assistant", "content": ""}, None),
        _chunk({"content": "GPU hours rose"}, None),
        _chunk({"content": " 4 percent;"}, None),
        _chunk({"content": " storage stayed flat."}, "stop"),
        {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": SERVED_NAME,
            "choices": [],
            "usage": {
                "prompt_tokens": 41,
                "completion_tokens": 12,
                "total_tokens": 53,
                "prompt_tokens_details": {"cached_tokens": 16},
            },
        },
    ]
    parts = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events]
    parts.append("data: [DONE]\n\n")
    return "".join(parts)


def canned_models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": SERVED_NAME, "object": "model", "created": CREATED, "owned_by": "vllm"}],
    }


def request_body(stream: bool) -> str:
    """The ~250-byte chat request every target gets."""
    body: dict[str, Any] = {
        "model": MODEL_STREAM if stream else MODEL_JSON,
        "messages": [
            {"role": "system", "content": "You are a terse assistant for the platform team."},
            {
                "role": "user",
                "content": "Summarise last quarter's GPU cost report in one short sentence.",
            },
        ],
        "max_tokens": 16,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


# --------------------------------------------------------------------------------------------
# Quoting helpers
# --------------------------------------------------------------------------------------------


def nginx_quote(text: str) -> str:
    """Quote ``text`` as an nginx single-quoted string (``return 200 '...'``).

    nginx un-escapes backslash, quotes and \\n/\\r/\\t inside quoted strings; ``$`` would start a
    variable and cannot be escaped, so it is refused.
    """
    if "$" in text:
        raise ValueError("nginx return text must not contain '$'")
    out = text.replace("\\", "\\\\").replace("'", "\\'")
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{out}'"


def lua_quote(text: str) -> str:
    """Quote ``text`` as a Lua double-quoted string literal."""
    out: list[str] = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.extend(f"\\{b}" for b in ch.encode())
    return '"' + "".join(out) + '"'


# --------------------------------------------------------------------------------------------
# Process bookkeeping
# --------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised from a signal handler so that ``finally`` blocks run."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


class Processes:
    """Every child this script starts, each in its own session, stopped in reverse order."""

    def __init__(self, pin: dict[str, set[int]] | None = None) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        # role ("wrk" or "server") -> CPUs its processes are pinned to
        self._pin = pin or {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        cpus = self._pin.get("wrk" if name == "wrk" else "server")

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with log.open("ab") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=pin if cpus else None,
            )
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        # Children the leader left behind (e.g. gateway workers) share its process group.
        _signal_group(proc, signal.SIGKILL)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader: pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, _on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}; log:\n{tail(log)}")
        try:
            status, _, body = http("GET", url, timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.1)
    raise BenchError(f"{name} not ready at {url} after {timeout:.0f}s ({last}); log:\n{tail(log)}")


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------


@dataclass
class Stub:
    json_port: int
    sse_port: int

    @property
    def json_url(self) -> str:
        return f"http://{HOST}:{self.json_port}"

    @property
    def sse_url(self) -> str:
        return f"http://{HOST}:{self.sse_port}"


def _nginx_dirs(prefix: Path) -> dict[str, str]:
    prefix.mkdir(parents=True, exist_ok=True)
    # When run as root the worker drops to "nobody"; let it traverse its own prefix.
    prefix.chmod(0o755)
    return {"prefix": str(prefix), "pid": str(prefix / "nginx.pid")}


def start_nginx(
    procs: Processes, conf_text: str, prefix: Path, name: str
) -> subprocess.Popen[bytes]:
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    log = prefix / "nginx.out"
    error_log = prefix / "error.log"
    check = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(prefix), "-e", str(error_log), "-c", str(conf)],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise BenchError(f"{name}: nginx -t failed:\n{check.stdout}{check.stderr}")
    return procs.start(
        name, ["nginx", "-p", str(prefix), "-e", str(error_log), "-c", str(conf)], log
    )


def start_stub(procs: Processes, work: Path, timeout: float) -> Stub:
    stub = Stub(json_port=free_port(), sse_port=free_port())
    prefix = work / "nginx-stub"
    dirs = _nginx_dirs(prefix)
    conf = string.Template(NGINX_TEMPLATE.read_text()).substitute(
        dirs,
        host=HOST,
        json_port=stub.json_port,
        sse_port=stub.sse_port,
        completion=nginx_quote(json.dumps(canned_completion(), separators=(",", ":"))),
        sse=nginx_quote(canned_stream()),
        models=nginx_quote(json.dumps(canned_models(), separators=(",", ":"))),
    )
    proc = start_nginx(procs, conf, prefix, "nginx-stub")
    wait_ready(f"{stub.json_url}/health", proc, prefix / "error.log", "nginx stub", timeout)
    wait_ready(f"{stub.sse_url}/health", proc, prefix / "error.log", "nginx stub (sse)", timeout)
    return stub


def start_nginx_proxy(procs: Processes, work: Path, upstream: str, timeout: float) -> str:
    port = free_port()
    prefix = work / "nginx-proxy"
    dirs = _nginx_dirs(prefix)
    conf = string.Template(PROXY_TEMPLATE.read_text()).substitute(
        dirs, host=HOST, port=port, upstream=upstream.removeprefix("http://")
    )
    proc = start_nginx(procs, conf, prefix, "nginx-proxy")
    url = f"http://{HOST}:{port}"
    wait_ready(f"{url}/healthz", proc, prefix / "error.log", "nginx proxy", timeout)
    return url


# --------------------------------------------------------------------------------------------
# Gateway
# --------------------------------------------------------------------------------------------

GATEWAY_CONFIG = """\
# Generated by bench/overhead.py
server:
  host: $host
  port: $port
database:
  url: "$db_url"
admin:
  key: "$admin_key"
cost_centers:
  cc-bench:
    name: Bench
teams:
  $team:
    cost_center: cc-bench
models:
  $model_json:
    deployments:
      - {kind: vllm, url: "$json_url", served_name: $served_name}
  $model_stream:
    deployments:
      - {kind: vllm, url: "$sse_url", served_name: $served_name}
prices: {}
"""


@dataclass
class Gateway:
    url: str
    key: str
    config: Path
    argv: list[str]
    log: Path


def write_gateway_config(work: Path, stub: Stub, port: int, template: Path | None) -> Path:
    text = template.read_text() if template else GATEWAY_CONFIG
    cfg = work / "bastion.yaml"
    cfg.write_text(
        string.Template(text).substitute(
            host=HOST,
            port=port,
            db_url=f"sqlite:///{work / 'bastion.db'}",
            admin_key="bench-admin-" + os.urandom(16).hex(),
            team=TEAM,
            model_json=MODEL_JSON,
            model_stream=MODEL_STREAM,
            served_name=SERVED_NAME,
            json_url=stub.json_url,
            sse_url=stub.sse_url,
        )
    )
    cfg.chmod(0o600)
    return cfg


def run_cli(argv: Sequence[str], what: str, env: dict[str, str]) -> str:
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what} failed: {exc}") from exc
    if out.returncode != 0:
        raise BenchError(
            f"{what} failed ({shlex.join(argv)} -> {out.returncode}):\n{out.stdout}{out.stderr}"
        )
    return out.stdout


def start_gateway(procs: Processes, work: Path, stub: Stub, args: argparse.Namespace) -> Gateway:
    port = free_port()
    cfg = write_gateway_config(work, stub, port, args.config_template)
    env = dict(os.environ, BASTION_CONFIG=str(cfg))
    bastion = str(args.bastion)

    if args.api_key:
        key = args.api_key
    else:
        run_cli([bastion, "db", "upgrade", "--config", str(cfg)], "bastion db upgrade", env)
        out = run_cli(
            [bastion, "keys", "create", "--team", TEAM, "--config", str(cfg)],
            "bastion keys create",
            env,
        )
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        key = lines[-1] if lines else ""
        if not key.startswith("bst-"):
            raise BenchError(f"bastion keys create: last line is not a bst- key:\n{out}")

    placeholders = {
        "config": str(cfg),
        "host": HOST,
        "port": str(port),
        "python": sys.executable,
        "venv": str(ROOT / ".venv"),
        "root": str(ROOT),
        "bastion": bastion,
    }
    if args.gateway_cmd:
        argv = [part.format(**placeholders) for part in shlex.split(args.gateway_cmd)]
    else:
        argv = [bastion, "serve", "--config", str(cfg)]
    log = work / "gateway.log"
    proc = procs.start("gateway", argv, log, env=env, cwd=ROOT)
    url = f"http://{HOST}:{port}"
    wait_ready(f"{url}/healthz", proc, log, "gateway", args.startup_timeout)
    return Gateway(url=url, key=key, config=cfg, argv=argv, log=log)


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME_RE = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_PCT_RE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s*$")
_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_REQS_RE = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+),", re.M)
_NON2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCK_RE = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)


def parse_time_ms(text: str) -> float:
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"unparseable wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


@dataclass
class WrkStats:
    requests_per_sec: float
    requests: int
    duration_ms: float
    percentiles_ms: dict[str, float]
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def p50_ms(self) -> float:
        return self.percentiles_ms["50"]

    @property
    def p99_ms(self) -> float:
        return self.percentiles_ms["99"]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(output: str) -> WrkStats:
    """Parse ``wrk --latency`` text output."""
    rps = _RPS_RE.search(output)
    reqs = _REQS_RE.search(output)
    if not rps or not reqs:
        raise ValueError("wrk output has no Requests/sec or request count")
    percentiles: dict[str, float] = {}
    in_dist = False
    for line in output.splitlines():
        if line.strip() == "Latency Distribution":
            in_dist = True
            continue
        if in_dist:
            m = _PCT_RE.match(line)
            if not m:
                break
            percentiles[f"{float(m.group(1)):g}"] = parse_time_ms(m.group(2))
    if "50" not in percentiles or "99" not in percentiles:
        raise ValueError("wrk output has no latency distribution (was --latency given?)")
    non2xx = _NON2XX_RE.search(output)
    sock = _SOCK_RE.search(output)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock:
        socket_errors = dict(zip(socket_errors, map(int, sock.groups()), strict=True))
    return WrkStats(
        requests_per_sec=float(rps.group(1)),
        requests=int(reqs.group(1)),
        duration_ms=parse_time_ms(reqs.group(2)),
        percentiles_ms=percentiles,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def write_lua(work: Path, body: str, key: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = {lua_quote("Bearer " + key)}' if key else ""
    lua = string.Template(POST_LUA_TEMPLATE.read_text()).substitute(
        body=lua_quote(body), auth_header=auth
    )
    path = work / f"post-{'auth' if key else 'noauth'}.lua"
    path.write_text(lua)
    return path


def run_wrk(
    procs: Processes,
    work: Path,
    url: str,
    script: Path,
    concurrency: int,
    duration: float,
    wrk_timeout: float,
) -> str:
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{duration:g}s",
        f"--timeout={wrk_timeout:g}s",
        "-s",
        str(script),
        "--latency",
        url,
    ]
    log = work / "wrk.out"
    log.write_bytes(b"")
    proc = procs.start("wrk", argv, log)
    try:
        proc.wait(timeout=duration + wrk_timeout + 30)
    finally:
        procs.stop(proc)
    output = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {shlex.join(argv)}\n{output}")
    return output


# --------------------------------------------------------------------------------------------
# Sanity checks
# --------------------------------------------------------------------------------------------


def check_response(name: str, url: str, body: str, key: str | None, stream: bool) -> str:
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
    ctype = {k.lower(): v for k, v in resp_headers.items()}.get("content-type", "")
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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Point:
    target: str
    concurrency: int
    url: str
    stats: WrkStats | None = None
    error: str | None = None
    raw: str = ""


@dataclass
class Report:
    started: str
    args: dict[str, Any]
    env: dict[str, Any]
    points: list[Point] = field(default_factory=list)


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def render_table(points: Sequence[Point]) -> str:
    direct = {p.concurrency: p.stats for p in points if p.target == DIRECT and p.stats}
    header = ["target", "conc", "req/s", "p50", "p99", "added p50", "req/s ratio", "errors"]
    rows: list[list[str]] = []
    for p in points:
        if p.stats is None:
            what = "FAILED" if p.error else "n/a"
            rows.append([p.target, str(p.concurrency), what, "-", "-", "-", "-", "-"])
            continue
        base = direct.get(p.concurrency)
        added = ratio = "-"
        if p.target != DIRECT and base is not None:
            added = f"{p.stats.p50_ms - base.p50_ms:+.3f} ms"
            if base.requests_per_sec:
                ratio = f"{p.stats.requests_per_sec / base.requests_per_sec:.3f}"
        rows.append(
            [
                p.target,
                str(p.concurrency),
                f"{p.stats.requests_per_sec:,.0f}",
                _fmt_ms(p.stats.p50_ms),
                _fmt_ms(p.stats.p99_ms),
                added,
                ratio,
                str(p.stats.errors),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_json(path: Path, report: Report) -> None:
    doc = asdict(report)
    for p, d in zip(report.points, doc["points"], strict=True):
        if p.stats is not None:
            d["stats"]["errors"] = p.stats.errors
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


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

    # (name, url for wrk, bearer key)
    targets: list[tuple[str, str, str | None]] = []
    gateway: Gateway | None = None
    if not args.direct_only:
        gateway = start_gateway(procs, work, stub, args)
        report.env["gateway_cmd"] = shlex.join(gateway.argv)
        print(f"# gateway: {shlex.join(gateway.argv)} at {gateway.url}", flush=True)
    key = gateway.key if gateway else None
    targets.append((DIRECT, f"{stub_url}/v1/chat/completions", key))
    if args.proxy_baseline:
        proxy = start_nginx_proxy(procs, work, stub_url, args.startup_timeout)
        targets.append((NGINX_PROXY, f"{proxy}/v1/chat/completions", key))
    if gateway:
        targets.append((GATEWAY, f"{gateway.url}/v1/chat/completions", gateway.key))

    scripts: dict[str | None, Path] = {}
    for name, url, tkey in targets:
        ctype = check_response(name, url, body, tkey, args.stream)
        print(f"# {name}: {url} -> 200 {ctype}", flush=True)
        if tkey not in scripts:
            scripts[tkey] = write_lua(work, body, tkey)

    if args.warmup > 0:
        for name, url, tkey in targets:
            out = run_wrk(procs, work, url, scripts[tkey], 8, args.warmup, args.wrk_timeout)
            stats = parse_wrk(out)
            if stats.errors and name != DIRECT:
                msg = f"{name}: warm-up had {stats.non_2xx} non-2xx, {stats.socket_errors}"
                if not args.keep_going:
                    raise BenchError(f"{msg}\n{out}")
                print(f"# WARNING {msg}", flush=True)

    for conc in args.concurrency:
        for name, url, tkey in targets:
            point = Point(target=name, concurrency=conc, url=url)
            report.points.append(point)
            try:
                point.raw = run_wrk(
                    procs, work, url, scripts[tkey], conc, args.duration, args.wrk_timeout
                )
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
                f"{point.stats.requests_per_sec:,.0f} req/s  p50 {_fmt_ms(point.stats.p50_ms)}"
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
