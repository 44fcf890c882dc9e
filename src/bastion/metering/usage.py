"""Usage records: one per request, whatever its outcome, written in batches off the event loop.

The request path only appends to a queue (a few hundred nanoseconds); every
`database.usage_flush_seconds` a writer thread hands the queued records to the usage writer
process (`usage_process.py`), which inserts them. On shutdown the writer drains the queue
before the gateway exits, and a failed write is retried rather than dropped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from bastion.metering.hourly import add_batch
from bastion.metering.settings import PriceSettings
from bastion.metering.usage_process import UsageProcess
from bastion.store.schema import usage

log = logging.getLogger("bastion.metering")


def cost_micros(
    prompt: int, cached: int, completion: int, p: PriceSettings, rounding: str = ROUND_HALF_UP
) -> int:
    """The price book's cost of some tokens in micro-units (millionths of the currency).

    Prices are per 1M tokens, so tokens x price is already in micro-units: exact in Decimal,
    rounded once to a whole micro-unit (half up for what is charged; a reservation rounds up).
    """
    cached = min(cached, prompt)
    cached_price = p.cached_prompt if p.cached_prompt is not None else p.prompt
    exact = (prompt - cached) * p.prompt + cached * cached_price + completion * p.completion
    return int(exact.to_integral_value(rounding=rounding))


def money(micros: int) -> str:
    """Micro-units as an exact decimal string, always 6 places: 50000 -> '0.050000'."""
    return format(Decimal(micros).scaleb(-6), "f")


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    endpoint: str
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    key_id: str | None = None
    team: str | None = None
    cost_center: str | None = None
    user: str | None = None
    client_user: str | None = None
    #: The name the client called: an alias, or a router (`routers:`).
    model: str | None = None
    #: The alias whose deployment served the call (a router's choice, a fallback), and that
    #: deployment; for a call that failed, the last one tried.
    served_model: str | None = None
    deployment: str | None = None
    #: The registry adapter (NAME@VERSION) applied, when `model` is an adapter alias.
    adapter: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    #: In micro-units of `currency` (None: the model has no price).
    cost_micros: int = 0
    currency: str | None = None
    status: int = 200
    outcome: str = "ok"
    error_code: str | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    #: No usage came from the engine: the prompt is Bastion's own count, the completion a chunk
    #: count (a cancelled or broken answer).
    tokens_estimated: bool = False

    def price(self, p: PriceSettings | None) -> None:
        """Costs the record; `p` comes from `resolved_prices` (its currency filled in)."""
        if p is None:
            return
        self.cost_micros = cost_micros(
            self.prompt_tokens, self.cached_tokens, self.completion_tokens, p
        )
        self.currency = p.currency


_FIELDS = tuple(f.name for f in fields(UsageRecord))


class UsageWriter:
    #: Rows per transaction.
    BATCH = 512

    def __init__(self, engine: Engine, flush_seconds: float):
        self._engine = engine
        self._every = flush_seconds
        # The rows go to the database from a process of its own (usage_process.py), except
        # for an in-memory database, which no other process can reach (tests).
        url = engine.url
        in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
        self._process = (
            None if in_memory else UsageProcess(url.render_as_string(hide_password=False), _FIELDS)
        )
        self._q: queue.SimpleQueue[UsageRecord] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bastion-usage-writer", daemon=True)
        self.written = 0

    def open(self) -> None:
        """Starts the writer process and thread (synchronous callers: the lifecycle uses
        `start`)."""
        if self._process is not None:
            self._process.start()
        self._thread.start()

    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    async def stop(self) -> None:
        """Drains every queued record into the database (in a worker thread, off the loop)."""
        await asyncio.to_thread(self.close)

    def pending(self) -> int:
        """Records queued, not yet taken by the writer (the backlog gauge)."""
        return self._q.qsize()

    def add(self, rec: UsageRecord) -> None:
        self._q.put_nowait(rec)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the writer after everything queued so far is in the database."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "usage writer did not finish within %.0fs; %d records pending",
                timeout,
                self._q.qsize(),
            )

    def _drain(self) -> list[UsageRecord]:
        out: list[UsageRecord] = []
        while len(out) < self.BATCH:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                break
        return out

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._process is not None:
                self._process.close()

    def _loop(self) -> None:
        pending: list[UsageRecord] = []
        backoff = self._every
        while True:
            stopping = self._stop.wait(self._every if not pending else backoff)
            pending.extend(self._drain())
            while pending:
                try:
                    self._write(pending)
                    self.written += len(pending)
                    pending = self._drain()
                    backoff = self._every
                except Exception:
                    log.exception("writing %d usage records failed; will retry", len(pending))
                    backoff = min(backoff * 2, 5.0)
                    if stopping and backoff >= 5.0:
                        log.error("giving up on %d usage records at shutdown", len(pending))
                        return
                    time.sleep(backoff)
            if stopping and self._q.empty():
                return

    def _write(self, batch: list[UsageRecord]) -> None:
        if self._process is not None:
            self._process.write([[getattr(r, f) for f in _FIELDS] for r in batch])
        else:
            write_batch(self._engine, [{f: getattr(r, f) for f in _FIELDS} for r in batch])


def write_batch(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Inserts usage rows and adds them to the hourly rollups in the same transaction (so the
    rollups never count a record that is not there, nor miss one that is)."""
    try:
        with engine.begin() as conn:
            _insert(conn, rows)
            add_batch(conn, rows)
    except IntegrityError:
        # A retried batch partly written before: insert one by one, skipping duplicates (a
        # duplicate's transaction rolls back its rollup too).
        for row in rows:
            try:
                with engine.begin() as conn:
                    conn.execute(usage.insert(), row)
                    add_batch(conn, [row])
            except IntegrityError:
                pass


def _insert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """The rows in one statement: COPY on PostgreSQL, else the driver's executemany with plain
    tuples. The writer thread shares the interpreter lock with the event loop, and SQLAlchemy's
    per-row parameter processing was most of its cost (measured: docs/benchmarks.md)."""
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(tuple(row[f] for f in _FIELDS))
        except Exception as exc:  # psycopg's own error: a duplicate is what the caller handles
            if getattr(exc, "sqlstate", None) == "23505":  # unique_violation
                raise IntegrityError(_COPY, None, exc) from exc
            raise
        return
    conn.execute(usage.insert(), rows)


_COPY = "COPY usage ({}) FROM STDIN".format(", ".join(f'"{f}"' for f in _FIELDS))
