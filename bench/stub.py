"""What every target of ``bench/overhead.py`` stands on: the child processes and the stub.

Read top to bottom:

1. names, small HTTP helpers and the child processes (each in its own process group);
2. the canned vLLM-style answers of the stub and the request every target gets;
3. nginx: the stub engine (canned JSON on one port, canned SSE on another) and the optional
   keep-alive reverse proxy, the C floor for one hop.

The gateways in front of the stub (Bastion, LiteLLM) are in ``bench/targets.py``. Standard
library only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import FrameType
from typing import Any

HOST = "127.0.0.1"
SERVED_NAME = "stub-model"  # the model name the stub engine reports
MODEL_JSON = "stub"  # model routed to the JSON stub
MODEL_STREAM = "stub-stream"  # model routed to the SSE stub
CHAT_PATH = "/v1/chat/completions"

# Target names, as they appear in the table and the JSON; a baseline is "bastion@REF".
DIRECT = "direct"
NGINX_PROXY = "nginx-proxy"
GATEWAY = "bastion"
LITELLM = "litellm"


class BenchError(RuntimeError):
    pass


@dataclass
class Target:
    """One row of the table: where wrk sends the request, with which key."""

    name: str
    url: str  # the full POST URL
    key: str | None = None  # sent as "Authorization: Bearer <key>"
    log: Path | None = None  # its server's log, tailed when a point fails
    info: dict[str, Any] = field(default_factory=dict)  # command, version: for the JSON
    pid: int | None = None  # its server's session leader, for cpu/req (None: not measured)


# -- 1. helpers and processes -------------------------------------------------------------------
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
) -> tuple[int, Message, bytes]:
    """One request; returns status, headers (case-insensitive) and body, also for 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
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


class Interrupted(Exception):
    """Raised from a signal handler so that ``finally`` blocks run."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` while the block runs."""
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, _on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader: pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Processes:
    """Every child the bench starts, each in its own session, stopped in reverse order."""

    def __init__(self, pin: dict[str, set[int]] | None = None) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
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
        """Start ``argv`` with stdout and stderr appended to ``log``; ``name`` picks the pin."""
        cpus = self._pin.get("wrk" if name == "wrk" else "server")
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=functools.partial(os.sched_setaffinity, 0, cpus) if cpus else None,
            )
        self._procs.append(proc)
        return proc

    def last(self) -> subprocess.Popen[bytes]:
        return self._procs[-1]

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, then reap leftovers."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        # Children the leader left behind (e.g. gateway workers) share its process group.
        _signal_group(proc, signal.SIGKILL)
        self._procs = [p for p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by every process in session
    ``sid``: a server started by :class:`Processes` and all its children (nginx's worker,
    uvicorn's). It counts only time on a CPU, not time spent waiting for one."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # After "pid (comm) ": state ppid pgrp session ... utime stime cutime cstime (14-17).
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:
            # cutime/cstime: children that exited and were reaped, no longer in /proc.
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / _CLK_TCK


# -- 2. canned answers and the request ----------------------------------------------------------
CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench5f0c1d2e3a4b5c6d7e8f9a0b"
CONTENT = ["GPU hours rose", " 4 percent;", " storage stayed flat."]
USAGE: dict[str, Any] = {
    "prompt_tokens": 41,
    "completion_tokens": 12,
    "total_tokens": 53,
    "prompt_tokens_details": {"cached_tokens": 16},
}


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def canned_completion() -> str:
    """A non-streaming chat completion as vLLM's OpenAI server returns it (compact JSON)."""
    message = {"role": "assistant", "content": "".join(CONTENT), "tool_calls": []}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }
    return _compact(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": SERVED_NAME,
            "choices": [choice],
            "usage": USAGE,
            "prompt_logprobs": None,
        }
    )


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": SERVED_NAME,
        "choices": choices,
        "usage": usage,
    }


def _delta(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _chunk([choice], None)


def canned_stream() -> str:
    """An SSE body as vLLM streams it with ``stream_options.include_usage``."""
    events = [
        _delta({"role": "assistant", "content": ""}, None),
        _delta({"content": CONTENT[0]}, None),
        _delta({"content": CONTENT[1]}, None),
        _delta({"content": CONTENT[2]}, "stop"),
        _chunk([], USAGE),
    ]
    return "".join(f"data: {_compact(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def canned_models() -> str:
    """``GET /v1/models`` (compact JSON)."""
    model = {"id": SERVED_NAME, "object": "model", "created": CREATED, "owned_by": "vllm"}
    return _compact({"object": "list", "data": [model]})


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


# -- 3. nginx: the stub engine and the reverse-proxy baseline -----------------------------------
# string.Template: $$ is a literal dollar. The stub: port $json_port answers the canned JSON
# completion, port $sse_port the canned SSE stream; both also /v1/models and /health.
NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid $pid;
events {
    worker_connections 4096;
}
"""
NGINX_HTTP_COMMON = """\
    access_log off;
    client_body_temp_path $prefix/client_body;
    proxy_temp_path $prefix/proxy;
    fastcgi_temp_path $prefix/fastcgi;
    uwsgi_temp_path $prefix/uwsgi;
    scgi_temp_path $prefix/scgi;
    # vLLM/uvicorn never close a keep-alive connection after N requests; nginx's default of
    # 1000 would make wrk and the proxies' upstream pools reconnect mid-run.
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server_tokens off;
"""
STUB_SERVER = """\
    server {
        listen $host:$port;
        location = /v1/chat/completions {
$answer
        }
        location = /v1/models {
            default_type application/json;
            return 200 $models;
        }
        location = /health {
            return 200;
        }
        location / {
            default_type application/json;
            return 404 '{"object":"error","message":"not found","code":404}';
        }
    }
"""
STUB_JSON_ANSWER = """\
            default_type application/json;
            return 200 $completion;"""
# The no-op substitution drops Content-Length, so the stream goes out with
# Transfer-Encoding: chunked like vLLM's (all events still in one write).
STUB_SSE_ANSWER = """\
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            sub_filter_types text/event-stream;
            sub_filter_once on;
            sub_filter 'data: [DONE]' 'data: [DONE]';
            return 200 $sse;"""
PROXY_HTTP = """\
    upstream stub {
        server $upstream;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen $host:$port;
        location = /healthz {
            return 200;
        }
        location / {
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
"""


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


def start_nginx(procs: Processes, prefix: Path, name: str, http_block: str) -> Path:
    """Write ``prefix/nginx.conf`` around ``http_block``, check it with ``nginx -t``, start
    nginx (``daemon off``, own prefix, pid and logs); returns its error log."""
    prefix.mkdir(parents=True, exist_ok=True)
    # When run as root the worker drops to "nobody"; let it traverse its own prefix.
    prefix.chmod(0o755)
    conf = prefix / "nginx.conf"
    head = string.Template(NGINX_COMMON + "http {\n" + NGINX_HTTP_COMMON).substitute(
        prefix=prefix, pid=prefix / "nginx.pid"
    )
    conf.write_text(f"# {name}, generated by bench/overhead.py\n{head}{http_block}}}\n")
    opts = ["-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    check = subprocess.run(["nginx", "-t", "-q", *opts], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"{name}: nginx -t failed:\n{check.stdout}{check.stderr}")
    procs.start(name, ["nginx", *opts], prefix / "nginx.out")
    return prefix / "error.log"


@dataclass
class Stub:
    json_url: str  # base URLs, no path
    sse_url: str


def start_stub(procs: Processes, work: Path, timeout: float) -> Stub:
    ports = free_port(), free_port()
    models = nginx_quote(canned_models())
    answers = [
        string.Template(STUB_JSON_ANSWER).substitute(completion=nginx_quote(canned_completion())),
        string.Template(STUB_SSE_ANSWER).substitute(sse=nginx_quote(canned_stream())),
    ]
    servers = "".join(
        string.Template(STUB_SERVER).substitute(host=HOST, port=port, answer=answer, models=models)
        for port, answer in zip(ports, answers, strict=True)
    )
    log = start_nginx(procs, work / "nginx-stub", "nginx-stub", servers)
    stub = Stub(json_url=f"http://{HOST}:{ports[0]}", sse_url=f"http://{HOST}:{ports[1]}")
    proc = procs.last()
    wait_ready(f"{stub.json_url}/health", proc, log, "nginx stub", timeout)
    wait_ready(f"{stub.sse_url}/health", proc, log, "nginx stub (sse)", timeout)
    return stub


def start_nginx_proxy(procs: Processes, work: Path, upstream: str, timeout: float) -> Target:
    """A keep-alive reverse proxy to ``upstream`` (a base URL)."""
    port = free_port()
    block = string.Template(PROXY_HTTP).substitute(
        host=HOST, port=port, upstream=upstream.removeprefix("http://")
    )
    log = start_nginx(procs, work / "nginx-proxy", "nginx-proxy", block)
    url = f"http://{HOST}:{port}"
    wait_ready(f"{url}/healthz", procs.last(), log, "nginx proxy", timeout)
    return Target(NGINX_PROXY, url + CHAT_PATH, log=log, pid=procs.last().pid)
