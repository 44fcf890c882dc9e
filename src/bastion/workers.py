"""`bastion serve`: one gateway process, or `--workers N` of them on one port under a supervisor.

The supervisor binds the listening socket once and hands it to N spawned workers, as uvicorn's
and gunicorn's pre-fork masters do: every worker accepts from the same socket, so the port stays
open while a worker restarts and nothing is bound per worker. A fresh
interpreter per worker (`spawn`, never `fork` of a process with threads and an event loop).

Each worker is a whole gateway with its own audit chain and write-ahead log, `<replica>-w<i>`
(the replica being `audit.replica`, else `<hostname>-<port>`): two processes must never write
one chain, and worker i keeps its chain across its restarts, so a restarted worker recovers what
its predecessor left in the log. Limits must be shared: N > 1 is refused unless
`limits.backend` is `redis` (in memory, each worker would grant a key its full limit).

A worker that dies is restarted: at once after a long run, else after a pause that doubles with
every quick death (to `MAX_BACKOFF_S`). SIGTERM or SIGINT is forwarded to every worker,
which drains as a single gateway does: it stops accepting, lets in-flight requests (streams
included) finish for up to `GRACE_S` and cuts the rest, then flushes usage and closes its
audit log with a signed checkpoint. The supervisor exits 0 when every worker stopped cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvicorn

from bastion.config import Settings
from bastion.observability.metrics import MULTIPROC_ENV, mark_process_dead

log = logging.getLogger("bastion.workers")
_ctx = multiprocessing.get_context("spawn")

#: In-flight requests get this long after SIGTERM before they are cut (uvicorn's graceful
#: shutdown); usage and audit are flushed after it either way.
GRACE_S = 30
#: A draining worker that is not gone this long after the grace (its usage flush and audit
#: shipment have their own time limits, 60 s at most) is killed; its log is the next start's.
STOP_MARGIN_S = 90
#: Restart pauses: 0.5 s, doubled for every death within `STABLE_S` of a start, at most this.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_S = 30.0
#: uvicorn's exit status for a failed start-up (lifespan or bind).
STARTUP_FAILURE = 3
CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)


def uvicorn_options(settings: Settings, host: str, port: int, log_level: str) -> dict[str, Any]:
    """The server options of every gateway process, one or many."""
    return {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": settings.logging.access_log,
        "server_header": False,  # no `server: uvicorn`: nothing to fingerprint, one header less
        "log_config": None,  # the gateway's own format (observability.logs) for uvicorn too
        # X-Forwarded-For is believed only from the configured load balancers (uvicorn would
        # otherwise trust it from 127.0.0.1, or from $FORWARDED_ALLOW_IPS).
        "proxy_headers": bool(settings.server.trusted_proxies),
        "forwarded_allow_ips": settings.server.trusted_proxies or [],
        "log_level": log_level,
        "timeout_graceful_shutdown": GRACE_S,
    }


def workers_problem(settings: Settings, workers: int) -> str | None:
    """Why `workers` processes cannot serve these settings, or None."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and settings.limits.backend != "redis":
        return (
            f"--workers {workers} needs limits.backend: redis (with limits.redis_url): with "
            "the in-memory backend each worker would count limits on its own, so a key would "
            f"get up to {workers} times its rpm, tpm, concurrency and budgets"
        )
    return None


def worker_replica(settings: Settings, port: int, index: int) -> str:
    """Worker `index`'s audit chain id: stable across its restarts, distinct from its peers'."""
    return f"{settings.audit.replica or f'{socket.gethostname()}-{port}'}-w{index}"


def serve(settings: Settings, *, host: str, port: int, log_level: str, workers: int) -> int:
    problem = workers_problem(settings, workers)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        return 2
    if workers == 1:
        from bastion.app import build_app

        uvicorn.run(
            build_app(settings, port=port), **uvicorn_options(settings, host, port, log_level)
        )
        return 0
    return Supervisor(settings, host, port, log_level, workers).run()


# -- the worker process -------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """Tells the supervisor once the gateway is started (lifespan done, socket served)."""

    ready: Connection

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.send(True)
            self.ready.close()


def _worker_main(
    dumped: dict[str, Any],
    index: int,
    sock: socket.socket,
    options: dict[str, Any],
    ready: Connection,
) -> None:
    from bastion.app import build_app
    from bastion.config import settings_model
    from bastion.observability.logs import configure_logging

    # The supervisor's settings, as read once: a restarted worker serves the same config as
    # its peers even if the file changed since (the class is built at run time: not picklable).
    settings = settings_model().model_validate(dumped)
    configure_logging(settings.logging, children=False)
    port = options["port"]
    audit = settings.audit.model_copy(update={"replica": worker_replica(settings, port, index)})
    settings = settings.model_copy(update={"audit": audit})
    supervisor = os.getppid()
    threading.Thread(target=_drain_if_orphaned, args=(supervisor,), daemon=True).start()
    server = _Server(uvicorn.Config(build_app(settings, port=port), workers=1, **options))
    server.ready = ready
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _drain_if_orphaned(supervisor: int) -> None:
    """A supervisor killed outright (kill -9) cannot stop its workers: each notices and drains
    on its own rather than serve on unsupervised."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


# -- the supervisor -----------------------------------------------------------------------------
@dataclass
class _Slot:
    """Worker `index`: its current process, and when it may be (re)started."""

    index: int
    proc: Any = None
    conn: Connection | None = None  # the worker says "ready" on it
    ready: bool = False
    started_at: float = 0.0
    deaths: int = 0  # quick deaths in a row: the restart pause doubles with each
    start_after: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, host: str, port: int, log_level: str, workers: int):
        self.settings = settings
        self.workers = workers
        self.options = uvicorn_options(settings, host, port, log_level)
        self.slots = [_Slot(i) for i in range(workers)]
        self.stopping = self.signalled = False
        self.sock: socket.socket | None = None

    def run(self) -> int:
        # Every worker's metrics in files here, summed by whichever worker a scrape reaches
        # (prometheus_client's multiprocess mode; observability.metrics). Fresh per start.
        metrics_dir = tempfile.mkdtemp(prefix="bastion-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            return self._run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        config = uvicorn.Config("bastion.app:build_app", **self.options)
        self.sock = config.bind_socket()  # logs the address, like a single uvicorn
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("supervisor %d starting %d workers", os.getpid(), self.workers)
        # Worker 0 alone first: what a first start creates (the schema, the audit keys) is
        # created once, not raced by N processes.
        self._start(self.slots[0])
        ok = self._all_ready(self.slots[:1])
        for slot in self.slots[1:] if ok else []:
            self._start(slot)
        if not (ok and self._all_ready(self.slots)):
            # Stopped while starting: a clean stop if asked to; a failed start is not.
            clean = self._stop_all()
            return clean if self.signalled else 1
        log.info("all %d workers serving", self.workers)
        while not self.stopping:
            self._watch()
        return self._stop_all()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, self.workers)
        self.stopping = self.signalled = True

    def _start(self, slot: _Slot) -> None:
        slot.conn, child = _ctx.Pipe(duplex=False)
        slot.ready = False
        slot.proc = _ctx.Process(
            target=_worker_main,
            args=(self.settings.model_dump(), slot.index, self.sock, self.options, child),
            name=f"bastion-worker-{slot.index}",
        )
        slot.proc.start()
        child.close()
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    @staticmethod
    def _check_ready(slot: _Slot) -> bool:
        if not slot.ready and slot.conn is not None and slot.conn.poll():
            with contextlib.suppress(EOFError):  # EOF: it died before saying so
                slot.ready = bool(slot.conn.recv())
            slot.conn.close()
            slot.conn = None
        return slot.ready

    def _all_ready(self, slots: list[_Slot]) -> bool:
        """The first start: a worker that cannot start (config, database, port) would fail the
        same way on every restart, so the whole server fails instead."""
        while not all(self._check_ready(s) for s in slots):
            if self.stopping:
                return False
            for slot in slots:
                if not slot.ready and slot.proc.exitcode is not None:
                    log.error(
                        "worker %d failed to start (exit status %s): stopping",
                        slot.index,
                        slot.proc.exitcode,
                    )
                    return False
            time.sleep(0.05)
        return True

    def _watch(self) -> None:
        """One turn: notice deaths at once, start what is due, return on a signal soon."""
        running = [s.proc.sentinel for s in self.slots if s.proc is not None]
        multiprocessing.connection.wait(running, timeout=0.2)
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None:
                self._check_ready(slot)
                if slot.proc.exitcode is not None:
                    self._died(slot, now)
            if slot.proc is None and now >= slot.start_after and not self.stopping:
                self._start(slot)

    def _died(self, slot: _Slot, now: float) -> None:
        if self.stopping:
            return  # how it ended is judged by the stop
        code = slot.proc.exitcode
        mark_process_dead(slot.proc.pid)  # its gauges leave the sums; its counters stay
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        slot.proc.close()
        slot.proc = None
        stable = slot.ready and now - slot.started_at >= STABLE_S
        slot.deaths = 0 if stable else slot.deaths + 1
        pause = 0.0 if stable else min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (slot.deaths - 1))
        slot.start_after = now + pause
        log.error("worker %d died (%s); restarting it in %.1f s", slot.index, how, pause)

    def _stop_all(self) -> int:
        """SIGTERM to every worker, wait for each one's own drain; 0 if all ended cleanly."""
        self.stopping = True
        for slot in self.slots:
            if slot.proc is not None and slot.proc.exitcode is None:
                os.kill(slot.proc.pid, signal.SIGTERM)
        if self.sock is not None:
            self.sock.close()  # the workers' copies close as they stop accepting
        deadline = time.monotonic() + GRACE_S + STOP_MARGIN_S
        clean = True
        for slot in self.slots:
            if slot.proc is None:
                continue
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.exitcode is None:
                log.error("worker %d did not stop in time: killed", slot.index)
                slot.proc.kill()
                slot.proc.join()
            # uvicorn drains on SIGTERM, then ends by the signal it caught.
            if slot.proc.exitcode not in CLEAN_EXITS:
                clean = False
                log.error("worker %d ended with exit status %s", slot.index, slot.proc.exitcode)
        log.info("supervisor %d stopped", os.getpid())
        return 0 if clean else 1
