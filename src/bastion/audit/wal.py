"""The audit write-ahead log: entries are durable (fdatasync) before `append` returns.

`append` stamps and chains the entry (chain.py) and writes it as a JSON line into the page
cache at once, in the caller's thread (microseconds, and no thread hop). A durable append then
waits for the sync thread, which flushes everything written so far with one fdatasync (group
commit) and wakes every request it covered. Every `checkpoint_entries` entries, or after
`checkpoint_seconds`, a signed checkpoint line follows.

`append(inline=True)` is for a caller that knows nobody else waits on its event loop (one
request in flight): the flush then runs on the loop itself, right after what is already
scheduled there (e.g. the counters' request going out), and spares the two thread hand-offs,
which on a quiet host cost as much as the flush. Under load the sync thread's group commit
keeps the loop free.

`append(durable=False)` returns once the entry is in the file: it survives the process being
killed, not yet a power cut, and becomes durable with the next flush, at most `SYNC_DELAY`
later. The gateway uses it for completion entries, so each request waits for one disk flush
(its request entry, before forwarding), not two.

Segments are files `<replica>-<first seq>.wal`; each process start begins a new one, and the
sync thread starts another past `SEGMENT_BYTES` (so the request path never waits for a
rotation's disk flushes), and the shipper can delete a segment as soon as the store holds all
of it. A torn last line (a crash
mid-write) is cut off when the log is reopened, and the chain continues from the last complete
entry. A lock file keeps two processes from ever writing the same replica's chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import Chain

log = logging.getLogger("bastion.audit")
SEGMENT_BYTES = 64 * 1024 * 1024
SYNC_DELAY = 0.05
Waiter = tuple[int, asyncio.Future[None]]


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
    """UTC timestamps from the wall clock, read afresh for every entry (so NTP corrections are
    followed), that never go backwards within a chain. The monotonic clock tells how much time
    really passed: when the wall clock disagrees by more than `STEP_SECONDS` (NTP stepped it,
    or someone set it), the entry records the step (`clock_step_s`), and a step back is held
    at the last time stamped instead of going back."""

    STEP_SECONDS = 1.0

    def __init__(self, not_before: str | None = None):
        self.last = datetime.fromisoformat(not_before).timestamp() if not_before else 0.0
        self._wall, self._mono = time.time(), time.monotonic()
        self._second, self._prefix = -1, ""

    def now(self) -> tuple[str, float | None]:
        """(the time stamp, the wall clock's step since the previous reading, if any)."""
        wall, mono = time.time(), time.monotonic()
        step = wall - (self._wall + (mono - self._mono))
        self._wall, self._mono = wall, mono
        t = max(wall, self.last)
        self.last = t
        # The date and time of the second are formatted once a second (two entries a request
        # made it a visible cost); microseconds truncated, so stamps never go backwards.
        micros = int(t * 1_000_000)
        second, micro = divmod(micros, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        stamp = f"{self._prefix}{micro:06d}+00:00"
        return stamp, round(step, 3) if abs(step) > self.STEP_SECONDS else None


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
        self._lockfile = os.open(directory / f"{replica}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfile)
            raise AuditLogError(
                f"audit replica {replica!r} is in use by another process "
                f"(set audit.replica to a unique id per gateway process)"
            ) from None
        last = _last_entry(directory, replica)
        #: The head comes from this host's own log (not from the store, which others can write).
        self.head_from_log = last is not None
        if stored_head is not None and (last is None or stored_head["seq"] > last["seq"]):
            last = stored_head  # shipped segments are deleted: the store knows where we were
        self.chain = Chain(replica, last["seq"], last["hash"]) if last else Chain(replica)
        self.clock = Clock(last.get("ts") if last else None)
        self.signing_key = signing_key
        self.cp_entries, self.cp_seconds = checkpoint_entries, checkpoint_seconds
        self._unsigned, self._signed_at = 0, time.monotonic()
        self.broken: AuditLogError | None = None
        self._open_segment(self.chain.seq + 1)
        _sync_dir(directory)  # the segment's name is durable too
        #: (segment, bytes) known to be on disk; the shipper reads no further.
        self.durable: tuple[Path, int] = (self.segment, self._size)
        #: Told the synced position after every flush (the shipper process listens).
        self.on_durable: Callable[[Path, int], None] | None = None
        self._lock = threading.Lock()  # the chain and the file: held for microseconds
        self._written = 0  # bytes written since open, across segments
        self._synced = 0
        self._waiters: list[Waiter] = []
        self._syncing = False  # the sync thread is flushing (outside the lock)
        self._kick = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bastion-audit-sync", daemon=True)
        self._thread.start()

    async def append(
        self, record: dict[str, Any], durable: bool = True, inline: bool = False
    ) -> dict[str, Any]:
        """The chained entry, once on disk (durable) or in the file (not); raises
        AuditLogError if it cannot be written. `inline`: flush on this event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry, end = self._write(record)
            if not durable:
                return entry
            fut: asyncio.Future[None] = loop.create_future()
            inline = inline and not self._waiters and self._size < SEGMENT_BYTES
            if inline:
                loop.call_soon(self._flush_here, end, fut)
            else:
                self._waiters.append((end, fut))
        if not inline:
            self._kick.set()
        await fut
        return entry

    def _flush_here(self, end: int, fut: asyncio.Future[None]) -> None:
        """An inline append's flush, on the loop; left to the sync thread if it is busy."""
        with self._lock:
            if self._synced < end and (self._syncing or self._waiters):
                self._waiters.append((end, fut))
                self._kick.set()
                return
            try:
                if self._synced < end:
                    if self.broken is not None:
                        raise self.broken
                    self._flush()
            except AuditLogError as exc:
                if not fut.done():
                    fut.set_exception(exc)
                return
        if not fut.done():
            fut.set_result(None)

    def close(self) -> None:
        self._closing = True
        self._kick.set()
        self._thread.join(30)
        with self._lock:
            if self.broken is None:
                try:
                    if self._unsigned and self.signing_key is not None:
                        self._write_lines([self._checkpoint_line()])
                    self._flush()
                except AuditLogError:
                    pass  # already logged; the unsigned tail is reported by `verify`
        os.close(self._fd)
        os.close(self._lockfile)

    def sign_head(self) -> bool:
        """Signs the chain head as this host's log holds it: a replica that stopped before its
        last checkpoint (a crash) leaves no unsigned tail behind (`bastion audit ship`)."""
        with self._lock:
            if self.signing_key is None or not self.head_from_log or self.broken is not None:
                return False
            self._write_lines([self._checkpoint_line()])
            self._flush()
        return True

    # -- writing (callers hold the lock) --------------------------------------------------------
    def _write(self, record: dict[str, Any]) -> tuple[dict[str, Any], int]:
        if self.broken is not None:
            raise self.broken
        saved = (self.chain.seq, self.chain.head)
        record["ts"], step = self.clock.now()
        if step is not None:
            record["clock_step_s"] = step
        entry = self.chain.append(record)
        lines = [orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)]
        self._unsigned += 1
        if self.signing_key is not None and self._unsigned >= self.cp_entries:
            lines.append(self._checkpoint_line())
        try:
            self._write_lines(lines)
        except AuditLogError:
            self.chain.seq, self.chain.head = saved  # nothing acknowledged: the chain rewinds
            self._unsigned = max(0, self._unsigned - 1)
            raise
        return entry, self._written

    def _checkpoint_line(self) -> bytes:
        assert self.signing_key is not None
        cp = self.chain.checkpoint(self.signing_key, self.clock.now()[0])
        self._unsigned, self._signed_at = 0, time.monotonic()
        return orjson.dumps({"checkpoint": cp}, option=orjson.OPT_SORT_KEYS)

    def _write_lines(self, lines: list[bytes]) -> None:
        data = b"\n".join(lines) + b"\n"
        size = self._size
        try:
            os.write(self._fd, data)
        except OSError as exc:
            error = AuditLogError(f"audit log write failed: {exc}")
            try:  # take back whatever reached the file, or the next entries reuse its seqs
                os.ftruncate(self._fd, size)
            except OSError:
                self.broken = error  # fail closed until restarted
            log.error("%s", error)
            raise error from exc
        self._size += len(data)
        self._written += len(data)

    def _flush(self) -> None:
        """fdatasync under the lock (closing, rotating); the sync thread does it without."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self.broken = AuditLogError(f"audit log sync failed: {exc}")
            raise self.broken from exc
        self._synced = self._written
        self._published(self.segment, self._size)

    def _published(self, segment: Path, size: int) -> None:
        self.durable = (segment, size)  # one tuple: readers see it whole
        if self.on_durable is not None:
            self.on_durable(segment, size)

    # -- the sync thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            self._kick.wait(SYNC_DELAY)
            self._kick.clear()
            with self._lock:
                if (
                    self.signing_key is not None
                    and self._unsigned
                    and time.monotonic() - self._signed_at >= self.cp_seconds
                    and self.broken is None
                ):
                    with contextlib.suppress(AuditLogError):
                        self._write_lines([self._checkpoint_line()])
                if self._written == self._synced and not self._waiters:
                    continue
                if self.broken is not None:  # a failed flush: nothing after it is trusted
                    done, self._waiters = self._waiters, []
                    _wake(done, self.broken)
                    continue
                target, segment, size = self._written, self.segment, self._size
                self._syncing = True
                fd = os.dup(self._fd)  # a rotation may close the original meanwhile
                rotated = size >= SEGMENT_BYTES and self.broken is None and self._rotate()
            error: AuditLogError | None = None
            try:
                os.fdatasync(fd)  # the group commit: everything written so far
                if rotated:
                    _sync_dir(self.directory)  # the new segment's name, before anything in it
            except OSError as exc:
                # After a failed flush the page cache cannot be trusted (fsyncgate): stop.
                error = AuditLogError(f"audit log sync failed: {exc}")
                log.error("%s", error)
            finally:
                os.close(fd)
            with self._lock:
                self._syncing = False
                if error is not None:
                    self.broken = error
                    done, self._waiters = self._waiters, []
                else:
                    self._synced = max(self._synced, target)
                    done = [w for w in self._waiters if w[0] <= target]
                    self._waiters = [w for w in self._waiters if w[0] > target]
                    if rotated or segment == self.segment:
                        self._published(segment, size)  # after a rotation: the old one, whole
            _wake(done, error)
        with self._lock:
            done, self._waiters = self._waiters, []
        _wake(done, None if self.broken is None else self.broken)

    def _open_segment(self, first_seq: int) -> None:
        self.segment = self.directory / f"{self.replica}-{first_seq:012d}.wal"
        self._fd = os.open(self.segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> bool:
        """A new segment from the next seq on (sync thread, under the lock, no disk flush: the
        old segment and the new name are synced right after, before anyone is acknowledged)."""
        try:
            old = self._fd
            self._open_segment(self.chain.seq + 1)
        except OSError as exc:
            log.error("audit log rotation failed, still writing to %s: %s", self.segment, exc)
            return False
        os.close(old)  # the sync thread flushes its duplicate
        return True


def _sync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _wake(waiters: list[Waiter], error: Exception | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _end, fut in waiters:
        by_loop.setdefault(fut.get_loop(), []).append(fut)
    for loop, futs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(_settle, futs, error)


def _settle(futs: list[asyncio.Future[None]], error: Exception | None) -> None:
    for fut in futs:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
