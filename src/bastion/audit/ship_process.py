"""The shipper in a process of its own, started and stopped by the gateway.

Parsing entries and inserting them is steady Python work; in the gateway's process it would
take the interpreter lock from the request path for tens of milliseconds at a time. The log's
writer publishes its synced position through shared memory after every flush, and the
shipper process never reads past it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("bastion.audit")
_ctx = multiprocessing.get_context("spawn")  # never fork a threaded server


class SharedPosition:
    """(segment, bytes) synced so far; the segment is kept as its first sequence number."""

    def __init__(self, directory: Path, replica: str):
        self.directory, self.replica = directory, replica
        self._lock = _ctx.Lock()
        self._seq = _ctx.Value("q", 0, lock=False)
        self._off = _ctx.Value("q", 0, lock=False)

    def set(self, segment: Path, offset: int) -> None:
        first = int(segment.stem.rsplit("-", 1)[1])
        with self._lock:
            self._seq.value, self._off.value = first, offset

    def get(self) -> tuple[Path, int]:
        with self._lock:
            first, offset = self._seq.value, self._off.value
        return self.directory / f"{self.replica}-{first:012d}.wal", offset


class ShipperProcess:
    def __init__(self, db_url: str, directory: Path, replica: str, interval: float = 0.5):
        self.position = SharedPosition(directory, replica)
        self.shipped = _ctx.Value("q", 0)
        self.errors = _ctx.Value("q", 0)
        self._stop = _ctx.Event()
        self._args = (db_url, str(directory), replica, interval)
        self._proc: Any = None
        self._guard = threading.Lock()

    def start(self) -> None:
        with self._guard:
            self._proc = _ctx.Process(
                target=_main,
                args=(*self._args, self.position, self._stop, self.shipped, self.errors),
                name="bastion-audit-shipper",
                daemon=True,
            )
            self._proc.start()

    def ensure_running(self) -> None:
        """Restarts the shipper if it died (it is stateless: the store is idempotent)."""
        if self._proc is not None and not self._proc.is_alive() and not self._stop.is_set():
            log.error("the audit shipper process exited (%s); restarting it", self._proc.exitcode)
            self.start()

    def stop(self, timeout: float = 60) -> None:
        """Asks for a last shipment of everything synced, then waits for the process."""
        self._stop.set()
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.error(
                    "the audit shipper did not finish in %.0f s; entries stay in the log", timeout
                )
                self._proc.kill()


def _main(
    db_url: str,
    directory: str,
    replica: str,
    interval: float,
    position: SharedPosition,
    stop: multiprocessing.synchronize.Event,
    shipped: Any,
    errors: Any,
) -> None:
    from bastion.audit.shipper import Shipper
    from bastion.observability.logs import configure_child_logging
    from bastion.store.db import make_engine

    # The gateway decides when this process ends (a last shipment on its way out), so the
    # signals an orchestrator sends the whole process group are left to the gateway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    configure_child_logging()  # the gateway's format (text or JSON lines)
    db = make_engine(db_url)

    def count(n: int) -> None:
        with shipped.get_lock():
            shipped.value += n

    def failed() -> None:
        with errors.get_lock():
            errors.value += 1

    shipper = Shipper(db, Path(directory), replica, position.get, on_shipped=count, on_error=failed)
    shipper.run(interval, _Until(stop, parent))
    db.dispose()


class _Until:
    """The stop event, which also fires if the gateway died without setting it (kill -9):
    its log is then the next start's to ship."""

    def __init__(self, stop: multiprocessing.synchronize.Event, parent: int):
        self.stop, self.parent = stop, parent

    def is_set(self) -> bool:
        return self.stop.is_set() or os.getppid() != self.parent

    def wait(self, timeout: float) -> bool:
        return self.stop.wait(timeout) or self.is_set()
