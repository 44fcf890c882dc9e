"""The audit write-ahead log: entries are durable (fdatasync) before `append` returns.

One writer thread per replica takes whatever entries are queued, stamps and chains them
(chain.py), writes them as JSON lines, syncs once for the whole group (group commit) and only
then wakes the requests waiting for them. Every `checkpoint_entries` entries or
`checkpoint_seconds` it also writes a signed checkpoint line.

`append(durable=False)` returns once the entry is written to the file (it survives the process
being killed, not yet a power cut); it becomes durable with the next sync — the next durable
entry, or at most `SYNC_DELAY` later. The gateway uses it for completion entries, so each
request waits for one disk flush (its request entry, before forwarding), not two.

Segments are files `<replica>-<first seq>.wal`; each process start begins a new one, so the
shipper can delete a segment as soon as the store holds all of it. A torn last line (a crash
mid-write) is cut off when the log is reopened, and the chain continues from the last complete
entry. A lock file keeps two processes from ever writing the same replica's chain.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import Chain

log = logging.getLogger("bastion.audit")
SEGMENT_BYTES = 64 * 1024 * 1024
SYNC_DELAY = 0.05
Waiter = asyncio.Future[dict[str, Any]] | None
Item = tuple[dict[str, Any], Waiter, bool]


class AuditLogError(RuntimeError):
    """The log cannot make entries durable: the gateway must not forward (fail closed)."""


def segments(directory: Path, replica: str | None = None) -> list[Path]:
    return sorted(directory.glob(f"{replica}-*.wal" if replica else "*.wal"))


def _last_entry(directory: Path, replica: str) -> dict[str, Any] | None:
    """The newest complete entry, after cutting a torn last line off the newest segment."""
    segs = segments(directory, replica)
    if segs:
        newest = segs[-1]
        data = newest.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a crash mid-write: the partial entry was never acknowledged
            with open(newest, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
    for seg in reversed(segs):
        for line in reversed(seg.read_bytes().splitlines()):
            if not line:
                continue
            obj = orjson.loads(line)
            if "checkpoint" not in obj:
                return obj  # type: ignore[no-any-return]
    return None


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def read_entries(directory: Path, replica: str | None = None) -> list[dict[str, Any]]:
    out = []
    for seg in segments(directory, replica):
        out += [obj for obj in read_lines(seg) if "checkpoint" not in obj]
    return out


class Clock:
    """UTC timestamps that never go backwards, even if the wall clock is stepped back."""

    def __init__(self, not_before: str | None = None):
        self.anchor = time.time() - time.monotonic()
        self.last = datetime.fromisoformat(not_before).timestamp() if not_before else 0.0

    def now(self) -> str:
        t = max(self.anchor + time.monotonic(), self.last)
        self.last = t
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


class AuditLog:
    def __init__(
        self,
        directory: Path,
        replica: str,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_entries: int = 1000,
        checkpoint_seconds: float = 10.0,
        stored_head: dict[str, Any] | None = None,
    ):
        self.directory = directory
        self.replica = replica
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = os.open(directory / f"{replica}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise AuditLogError(
                f"audit replica {replica!r} is in use by another process "
                f"(set audit.replica to a unique id per gateway process)"
            ) from None
        last = _last_entry(directory, replica)
        if stored_head is not None and (last is None or stored_head["seq"] > last["seq"]):
            last = stored_head  # shipped segments are deleted: the store knows where we were
        self.chain = Chain(replica, last["seq"], last["hash"]) if last else Chain(replica)
        self.clock = Clock(last.get("ts") if last else None)
        self.signing_key = signing_key
        self.cp_entries, self.cp_seconds = checkpoint_entries, checkpoint_seconds
        self._unsigned, self._signed_at = 0, time.monotonic()
        self.broken: AuditLogError | None = None
        self._dirty = False  # written but not yet synced
        self._open_segment(self.chain.seq + 1)
        #: (segment, bytes) known to be on disk; the shipper reads no further.
        self.durable: tuple[Path, int] = (self.segment, self._size)
        self._q: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bastion-audit-wal", daemon=True)
        self._thread.start()

    @property
    def head(self) -> tuple[int, str]:
        return self.chain.seq, self.chain.head

    async def append(self, record: dict[str, Any], durable: bool = True) -> dict[str, Any]:
        """Returns the chained entry once it is on disk (durable) or in the file (not);
        raises AuditLogError if it is not."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._q.put((record, fut, durable))
        return await fut

    def submit(self, record: dict[str, Any]) -> None:
        """Appends without waiting (a failure is logged by the writer)."""
        self._q.put((record, None, False))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(30)
        if self._dirty:
            self._sync()
        os.close(self._fd)
        os.close(self._lock)

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            timeout = None
            if self._unsigned and self.signing_key is not None:
                timeout = max(0.0, self._signed_at + self.cp_seconds - time.monotonic())
            if self._dirty:
                timeout = min(timeout if timeout is not None else SYNC_DELAY, SYNC_DELAY)
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                if self._dirty:
                    self._sync()
                if self._checkpoint_due(self._unsigned, False):
                    self._commit([])  # only the checkpoint that is due
                continue
            batch = [item]
            while not self._q.empty() and len(batch) < 1024:
                batch.append(self._q.get())
            stop = None in batch
            work = [b for b in batch if b is not None]
            if work or (stop and self._unsigned):
                self._commit(work, final=stop)
            if stop:
                return

    def _checkpoint_due(self, unsigned: int, final: bool) -> bool:
        if self.signing_key is None or not unsigned:
            return False
        elapsed = time.monotonic() - self._signed_at
        return final or unsigned >= self.cp_entries or elapsed >= self.cp_seconds

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            # After a failed flush the page cache cannot be trusted (fsyncgate): stop for good.
            self.broken = AuditLogError(f"audit log sync failed: {exc}")
            log.error("%s", self.broken)
            return
        self._dirty = False
        self.durable = (self.segment, self._size)  # one tuple: the shipper reads it whole

    def _commit(self, work: list[Item], final: bool = False) -> None:
        if self.broken is not None:
            return self._reject(work, self.broken)
        saved = (self.chain.seq, self.chain.head, self._size)
        entries = []
        for record, _fut, _durable in work:
            record["ts"] = self.clock.now()
            entries.append(self.chain.append(record))
        lines = [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in entries]
        unsigned = self._unsigned + len(entries)
        signed = self._checkpoint_due(unsigned, final)
        if signed:
            assert self.signing_key is not None
            cp = self.chain.checkpoint(self.signing_key, self.clock.now())
            lines.append(orjson.dumps({"checkpoint": cp}, option=orjson.OPT_SORT_KEYS))
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        try:
            if self._size + len(data) > SEGMENT_BYTES and self._size and entries:
                os.fdatasync(self._fd)
                os.close(self._fd)
                self._open_segment(entries[0]["seq"])
                saved = (*saved[:2], 0)
            os.write(self._fd, data)
        except OSError as exc:
            self.chain.seq, self.chain.head = saved[0], saved[1]  # nothing acknowledged
            error = AuditLogError(f"audit log write failed: {exc}")
            try:  # take back whatever reached the file, or the next entries reuse its seqs
                os.ftruncate(self._fd, saved[2])
            except OSError:
                self.broken = error  # fail closed until restarted
            log.error("%s", error)
            return self._reject(work, error)
        self._size += len(data)
        self._unsigned = 0 if signed else unsigned
        if signed:
            self._signed_at = time.monotonic()
        self._dirty = True
        if signed or final or any(durable for _r, _f, durable in work):
            self._sync()
            if self.broken is not None:
                return self._reject(work, self.broken)
        for (_record, fut, _durable), entry in zip(work, entries, strict=True):
            if fut is not None:
                fut.get_loop().call_soon_threadsafe(_done, fut, entry)

    def _reject(self, work: list[Item], error: Exception) -> None:
        for _record, fut, _durable in work:
            if fut is not None:
                fut.get_loop().call_soon_threadsafe(_fail, fut, error)

    def _open_segment(self, first_seq: int) -> None:
        self.segment = self.directory / f"{self.replica}-{first_seq:012d}.wal"
        self._fd = os.open(self.segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
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
