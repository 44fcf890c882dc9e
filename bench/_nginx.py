"""nginx: the stub engine (canned JSON and SSE answers) and the optional reverse-proxy baseline."""

from __future__ import annotations

import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _common import BENCH_DIR, HOST, BenchError, free_port, wait_ready
from _payloads import canned_completion, canned_models, canned_stream
from _procs import Processes

NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.template"
PROXY_TEMPLATE = BENCH_DIR / "nginx-proxy.conf.template"


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


def start_nginx(
    procs: Processes, template: Path, prefix: Path, name: str, **values: object
) -> subprocess.Popen[bytes]:
    """Render ``template`` into ``prefix/nginx.conf``, check it with ``nginx -t``, start nginx.

    ``$prefix`` and ``$pid`` are filled in here, the other placeholders from ``values``;
    nginx's own log goes to ``prefix/error.log``.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    # When run as root the worker drops to "nobody"; let it traverse its own prefix.
    prefix.chmod(0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(
        string.Template(template.read_text()).substitute(
            values, prefix=str(prefix), pid=str(prefix / "nginx.pid")
        )
    )
    opts = ["-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    check = subprocess.run(["nginx", "-t", "-q", *opts], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"{name}: nginx -t failed:\n{check.stdout}{check.stderr}")
    return procs.start(name, ["nginx", *opts], prefix / "nginx.out")


def start_stub(procs: Processes, work: Path, timeout: float) -> Stub:
    stub = Stub(json_port=free_port(), sse_port=free_port())
    prefix = work / "nginx-stub"
    proc = start_nginx(
        procs,
        NGINX_TEMPLATE,
        prefix,
        "nginx-stub",
        host=HOST,
        json_port=stub.json_port,
        sse_port=stub.sse_port,
        completion=nginx_quote(canned_completion()),
        sse=nginx_quote(canned_stream()),
        models=nginx_quote(canned_models()),
    )
    log = prefix / "error.log"
    wait_ready(f"{stub.json_url}/health", proc, log, "nginx stub", timeout)
    wait_ready(f"{stub.sse_url}/health", proc, log, "nginx stub (sse)", timeout)
    return stub


def start_nginx_proxy(procs: Processes, work: Path, upstream: str, timeout: float) -> str:
    """A keep-alive reverse proxy to ``upstream``; returns its base URL."""
    port = free_port()
    prefix = work / "nginx-proxy"
    proc = start_nginx(
        procs,
        PROXY_TEMPLATE,
        prefix,
        "nginx-proxy",
        host=HOST,
        port=port,
        upstream=upstream.removeprefix("http://"),
    )
    url = f"http://{HOST}:{port}"
    wait_ready(f"{url}/healthz", proc, prefix / "error.log", "nginx proxy", timeout)
    return url
