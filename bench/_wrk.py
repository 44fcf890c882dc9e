"""wrk: the Lua request script, one run, and parsing its ``--latency`` output."""

from __future__ import annotations

import re
import shlex
import string
from dataclasses import dataclass
from pathlib import Path

from _common import BENCH_DIR, BenchError
from _procs import Processes

POST_LUA_TEMPLATE = BENCH_DIR / "post.lua.template"

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME_RE = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_PCT_RE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s*$")
_RPS_RE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_REQS_RE = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+),", re.M)
_NON2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCK_RE = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)


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


def parse_time_ms(text: str) -> float:
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"unparseable wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


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
        elif in_dist:
            m = _PCT_RE.match(line)
            if not m:
                break
            percentiles[f"{float(m.group(1)):g}"] = parse_time_ms(m.group(2))
    if "50" not in percentiles or "99" not in percentiles:
        raise ValueError("wrk output has no latency distribution (was --latency given?)")
    non2xx = _NON2XX_RE.search(output)
    sock = _SOCK_RE.search(output)
    counts = [int(n) for n in sock.groups()] if sock else [0, 0, 0, 0]
    return WrkStats(
        requests_per_sec=float(rps.group(1)),
        requests=int(reqs.group(1)),
        duration_ms=parse_time_ms(reqs.group(2)),
        percentiles_ms=percentiles,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"), counts, strict=True)),
    )


def lua_quote(text: str) -> str:
    """Quote ``text`` as a Lua double-quoted string literal."""
    out: list[str] = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            # Three digits, so that a digit after the escape is not read as part of it.
            out.extend(f"\\{b:03d}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def write_lua(work: Path, body: str, key: str | None) -> Path:
    """The wrk script that POSTs ``body`` (with ``Authorization: Bearer key`` if given)."""
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
    """One ``wrk -t1`` run; returns its output (also left in ``work/wrk.out``)."""
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
