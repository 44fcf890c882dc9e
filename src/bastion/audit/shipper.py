"""Moves audit entries from the local write-ahead log into the store, at least once.

It reads only what the log has made durable (never an entry that a crash could still take
back), inserts it in batches (idempotent by replica and seq, so a repeat after a crash is
harmless) and deletes a segment only once the store has all of it and the log has moved on
to a newer one. If the store is down it retries; the log keeps growing on local disk meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from bastion.audit.store import insert_lines
from bastion.audit.wal import segments

log = logging.getLogger("bastion.audit")
BATCH_LINES = 2000


class Shipper:
    def __init__(
        self,
        db: Engine,
        directory: Path,
        replica: str | None = None,
        durable: Callable[[], tuple[Path, int]] | None = None,
        on_shipped: Callable[[int], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ):
        self.db = db
        self.directory = directory
        self.replica = replica
        #: The live log's synced position (segment, bytes); None ships whole files (the
        #: writer is gone, or holds off while we ship under its lock).
        self.durable = durable
        self.on_shipped = on_shipped
        self.on_error = on_error
        self.offsets: dict[Path, int] = {}

    # -- one pass -------------------------------------------------------------------------------
    def ship_once(self) -> int:
        """Ships everything durable now; returns the number of entries stored."""
        total = 0
        active, limit = self.durable() if self.durable is not None else (None, 0)
        for seg in segments(self.directory, self.replica):
            end = limit if seg == active else None
            try:
                total += self._ship_segment(seg, end)
                if seg != active and self.offsets.get(seg, 0) == seg.stat().st_size:
                    seg.unlink()  # the store has every line of it
                    self.offsets.pop(seg, None)
            except FileNotFoundError:  # another shipper (a dying one) finished it first
                self.offsets.pop(seg, None)
        return total

    def _ship_segment(self, seg: Path, end: int | None) -> int:
        start = self.offsets.get(seg, 0)
        with open(seg, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        if not data:
            return 0
        lines = data.splitlines(keepends=True)
        shipped = 0
        for i in range(0, len(lines), BATCH_LINES):
            chunk = lines[i : i + BATCH_LINES]
            objs = [orjson.loads(line) for line in chunk if line.strip()]
            with self.db.begin() as conn:
                if conn.dialect.name == "sqlite":
                    # The shipped segment is deleted next: the store's copy must be on disk.
                    conn.exec_driver_sql("PRAGMA synchronous=FULL")
                shipped += insert_lines(conn, objs)
            start += sum(len(line) for line in chunk)
            self.offsets[seg] = start
        if self.on_shipped is not None and shipped:
            self.on_shipped(shipped)
        return shipped

    # -- in the background ----------------------------------------------------------------------
    def run(self, interval: float, stop: Any) -> None:
        """Ships at a fixed pace until `stop` is set, then once more (the final shipment)."""
        backoff = interval
        while not stop.is_set():
            # A fixed pace, not every sync: batches stay large and the store's own flushes
            # do not compete with the log's for the disk.
            stop.wait(backoff)
            try:
                self.ship_once()
                backoff = interval
            except Exception:
                if self.on_error is not None:
                    self.on_error()
                log.exception("shipping audit entries to the store failed; retrying")
                backoff = min(backoff * 2, 10.0)
        try:
            self.ship_once()
        except Exception:
            log.exception("final audit shipment failed; the entries stay in %s", self.directory)
