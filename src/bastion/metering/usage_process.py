"""Usage records written to the database by a process of its own.

Inserting rows is steady Python work (the driver, the rollup sums); in a thread of the gateway
it took the interpreter lock from the event loop, and every lock handover cost the requests in
flight tens of microseconds (measured: docs/benchmarks.md). The gateway's writer thread now only
packs each batch into one message for this process and waits for its answer: "ok" once the
batch's transaction committed, or the error. A process that died is started again and the batch
sent again; `write_batch` skips rows already stored, so a batch is never counted twice.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import orjson

log = logging.getLogger("bastion.metering")
_ctx = multiprocessing.get_context("spawn")  # never fork a threaded server
OK = b"ok"
READY = b"ready"


class UsageWriteFailed(Exception):
    """The process could not store a batch (the database refused it, or is down)."""


class UsageProcess:
    """The writer process, seen from the gateway's writer thread (its only caller)."""

    def __init__(self, db_url: str, fields: tuple[str, ...]):
        self._args = (db_url, fields)
        self._proc: Any = None
        self._conn: Connection | None = None

    def write(self, rows: list[list[Any]]) -> None:
        """Returns once the rows are committed; raises UsageWriteFailed (the caller retries)."""
        payload = orjson.dumps(rows)
        for attempt in (1, 2):
            if self._conn is None:
                self.start()
            if self._conn is None:
                raise UsageWriteFailed("the usage writer process could not start")
            try:
                self._conn.send_bytes(payload)
                reply = self._reply(self._conn)
            except (EOFError, OSError) as exc:  # it died: once more, with a new one
                log.error("the usage writer process exited (%s); restarting it", exc)
                self.close()
                if attempt == 2:
                    raise UsageWriteFailed(f"the usage writer process exited: {exc}") from exc
                continue
            if reply != OK:
                raise UsageWriteFailed(reply.decode(errors="replace"))
            return

    def _reply(self, conn: Connection) -> bytes:
        while not conn.poll(1.0):
            if not self._proc.is_alive():
                raise EOFError(f"exit code {self._proc.exitcode}")
        return conn.recv_bytes()

    def start(self) -> None:
        """Starts the process and returns once it is ready for batches (a second or so: it
        imports the database layer), so that records are stored from the first request on."""
        ours, theirs = _ctx.Pipe()
        self._proc = _ctx.Process(
            target=_main, args=(*self._args, theirs), name="bastion-usage-writer", daemon=True
        )
        self._proc.start()
        theirs.close()  # the process sees EOF when the gateway is gone, however it went
        self._conn = ours
        try:
            if self._reply(ours) != READY:
                raise EOFError("it did not say it was ready")
        except (EOFError, OSError) as exc:
            log.error("the usage writer process did not start (%s)", exc)
            self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Ends the process (it finishes the batch in hand: nothing is sent without a reply)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout)
            self._proc = None


def _main(db_url: str, fields: tuple[str, ...], conn: Connection) -> None:
    from bastion.metering.usage import write_batch
    from bastion.observability.logs import configure_child_logging
    from bastion.store.db import make_engine

    # The gateway decides when this process ends (closing the pipe, after its last batch), so
    # the signals an orchestrator sends the whole process group are left to the gateway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_child_logging()
    db = make_engine(db_url)
    ts = fields.index("ts")
    conn.send_bytes(READY)
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the gateway closed the pipe, or is gone
            rows = []
            for values in orjson.loads(data):
                values[ts] = datetime.fromisoformat(values[ts])
                rows.append(dict(zip(fields, values, strict=True)))
            try:
                write_batch(db, rows)
            except Exception as exc:
                log.warning("writing %d usage records failed: %s", len(rows), exc)
                conn.send_bytes(f"{type(exc).__name__}: {exc}".encode())
                continue
            conn.send_bytes(OK)
    finally:
        db.dispose()
