"""Names, paths and small helpers shared by the ``bench/overhead.py`` modules."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

HOST = "127.0.0.1"
SERVED_NAME = "stub-model"
MODEL_JSON = "stub"  # gateway model routed to the JSON stub
MODEL_STREAM = "stub-stream"  # gateway model routed to the SSE stub
TEAM = "bench"

# Target names, as they appear in the table and the JSON.
DIRECT = "direct"
NGINX_PROXY = "nginx-proxy"
GATEWAY = "bastion"


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
