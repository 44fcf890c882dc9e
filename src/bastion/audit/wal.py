"""The audit write-ahead log: entries are durable (fdatasync) before `append` returns.

One writer thread per replica takes whatever entries are queued, chains them (chain.py),
writes them as JSON lines, syncs once for the whole group (group commit) and only then wakes
the requests waiting for them. Segments are files `<replica>-<first seq>.wal`; a torn last line
(a crash mid-write) is cut off when the log is reopened, and the chain continues from the last
complete entry.

Groundwork for issue 3: not yet on the request path; the shipper into the database and the
gateway wiring come next.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from pathlib import Path
from typing import Any

import orjson

from bastion.audit.chain import GENESIS, Chain

SEGMENT_BYTES = 64 * 1024 * 1024


class AuditLogError(RuntimeError):
    """The log cannot make entries durable: the gateway must not forward (fail closed)."""


def _recover(directory: Path, replica: str) -> tuple[int, str, Path | None]:
    """(last seq, last hash, newest segment) after cutting a torn last line."""
    segments = sorted(directory.glob(f"{replica}-*.wal"))
    if not segments:
        return 0, GENESIS, None
    newest = segments[-1]
    data = newest.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):  # a crash mid-write: the partial entry was never acknowledged
        with open(newest, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        data = data[:end]
    lines = data.splitlines()
    if not lines:
        return _recover_previous(segments[:-1], replica, newest)
    last = orjson.loads(lines[-1])
    return int(last["seq"]), str(last["hash"]), newest


def _recover_previous(older: list[Path], replica: str, newest: Path) -> tuple[int, str, Path]:
    for seg in reversed(older):
        lines = seg.read_bytes().splitlines()
        if lines:
            last = orjson.loads(lines[-1])
            return int(last["seq"]), str(last["hash"]), newest
    return 0, GENESIS, newest


def read_entries(directory: Path, replica: str | None = None) -> list[dict[str, Any]]:
    pattern = f"{replica}-*.wal" if replica else "*.wal"
    out = []
    for seg in sorted(directory.glob(pattern)):
        out += [orjson.loads(line) for line in seg.read_bytes().splitlines() if line]
    return out


class AuditLog:
    def __init__(self, directory: Path, replica: str):
        self.directory = directory
        self.replica = replica
        directory.mkdir(parents=True, exist_ok=True)
        seq, head, segment = _recover(directory, replica)
        self.chain = Chain(replica, seq, head)
        self._segment = segment or directory / f"{replica}-{seq + 1:012d}.wal"
        self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._q: queue.SimpleQueue[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]] | None]
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bastion-audit-wal", daemon=True)
        self._thread.start()

    async def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Returns the chained entry once it is on disk; raises AuditLogError if it is not."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._q.put((record, fut))
        return await fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(30)
        os.close(self._fd)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            batch = [item]
            while not self._q.empty() and len(batch) < 1024:
                batch.append(self._q.get())
            stop = None in batch
            work = [b for b in batch if b is not None]
            if work:
                self._commit(work)
            if stop:
                return

    def _commit(self, work: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        saved = (self.chain.seq, self.chain.head)
        try:
            entries = [self.chain.append(record) for record, _fut in work]
            data = b"".join(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) + b"\n" for e in entries)
            if self._size + len(data) > SEGMENT_BYTES and self._size:
                self._rotate(entries[0]["seq"])
            os.write(self._fd, data)
            os.fdatasync(self._fd)
            self._size += len(data)
        except OSError as exc:
            self.chain.seq, self.chain.head = saved  # nothing acknowledged: the chain rewinds
            error = AuditLogError(f"audit log write failed: {exc}")
            for _record, fut in work:
                fut.get_loop().call_soon_threadsafe(_fail, fut, error)
            return
        for (_record, fut), entry in zip(work, entries, strict=True):
            fut.get_loop().call_soon_threadsafe(_done, fut, entry)

    def _rotate(self, first_seq: int) -> None:
        os.close(self._fd)
        self._segment = self.directory / f"{self.replica}-{first_seq:012d}.wal"
        self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new segment's name is durable too
        finally:
            os.close(dir_fd)


def _done(fut: asyncio.Future[dict[str, Any]], entry: dict[str, Any]) -> None:
    if not fut.done():
        fut.set_result(entry)


def _fail(fut: asyncio.Future[dict[str, Any]], error: Exception) -> None:
    if not fut.done():
        fut.set_exception(error)
