"""The audit WAL: durable before acknowledged, chained, and whole after kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.audit.chain import verify
from bastion.audit.wal import AuditLog, AuditLogError, read_entries

PUB = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_concurrent_appends_are_chained_and_survive_reopen(tmp_path: Path) -> None:
    async def burst(log: AuditLog, n: int, tag: str) -> list[int]:
        entries = await asyncio.gather(*(log.append({"request_id": f"{tag}{i}"}) for i in range(n)))
        return [e["seq"] for e in entries]

    log = AuditLog(tmp_path, "gw-a")
    seqs = asyncio.run(burst(log, 200, "a"))
    log.close()
    assert sorted(seqs) == list(range(1, 201))
    log = AuditLog(tmp_path, "gw-a")  # reopened: the chain goes on where it stopped
    assert asyncio.run(burst(log, 10, "b")) == list(range(201, 211))
    log.close()
    entries = read_entries(tmp_path)
    assert len(entries) == 210 and verify(entries, [], PUB).ok


def test_write_failure_fails_closed(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "gw-a")

    async def scenario() -> None:
        await log.append({"n": 1})
        os.close(log._fd)  # the disk goes away under the log
        with pytest.raises(AuditLogError):
            await log.append({"n": 2})

    asyncio.run(scenario())
    log._fd = os.open(os.devnull, os.O_WRONLY)
    log.close()
    assert [e["seq"] for e in read_entries(tmp_path)] == [1]


def test_inline_appends_flush_on_the_loop_and_yield_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inline=True` (one request in flight): durable on return, flushed by the event loop's
    thread; while others wait on the sync thread, it joins their group commit instead."""
    import threading

    flushers: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushers.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    log = AuditLog(tmp_path, "gw-a")

    async def scenario() -> None:
        for i in range(5):
            await log.append({"n": i}, inline=True)
            assert log._synced == log._written  # on disk when acknowledged
        assert flushers == ["MainThread"] * 5
        flushers.clear()
        # Mixed with appends that wait for the sync thread: all durable, one chain.
        await asyncio.gather(*(log.append({"n": i}, inline=i % 2 == 0) for i in range(50)))
        assert log._synced == log._written
        assert "bastion-audit-sync" in flushers

    asyncio.run(scenario())
    log.close()
    entries = read_entries(tmp_path)
    assert [e["seq"] for e in entries] == list(range(1, 56)) and verify(entries, [], PUB).ok


def test_a_failed_inline_flush_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path, "gw-a")

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def scenario() -> None:
        await log.append({"n": 1}, inline=True)
        monkeypatch.setattr(os, "fdatasync", broken_disk)
        with pytest.raises(AuditLogError, match="sync failed"):
            await log.append({"n": 2}, inline=True)
        monkeypatch.undo()
        # The page cache cannot be trusted after a failed flush: nothing more is acknowledged.
        for inline in (True, False):
            with pytest.raises(AuditLogError):
                await log.append({"n": 3}, inline=inline)

    asyncio.run(scenario())
    log.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from bastion.audit.wal import AuditLog

    async def main():
        log = AuditLog(Path(sys.argv[1]), "gw-a")
        inline = sys.argv[2] == "inline"
        async def one(i):
            entry = await log.append({"request_id": f"r{i}", "body": "x" * 2000}, inline=inline)
            print(entry["seq"], flush=True)  # acknowledged: must survive kill -9
        i = 0
        while True:
            await asyncio.gather(*(one(i + k) for k in range(16)))
            i += 16
    asyncio.run(main())
""")


@pytest.mark.parametrize("flush", ["thread", "inline"])
def test_kill_9_loses_nothing_acknowledged(tmp_path: Path, flush: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), flush], stdout=subprocess.PIPE, text=True
    )
    acked: list[int] = []
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while len(acked) < 2000 and time.monotonic() < deadline:
        acked.append(int(proc.stdout.readline()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acked += [int(line) for line in proc.stdout.read().split()]
    log = AuditLog(tmp_path, "gw-a")  # recovery cuts a torn last line, if any
    log.close()
    entries = read_entries(tmp_path)
    on_disk = {e["seq"] for e in entries}
    assert set(acked) <= on_disk  # every acknowledged entry is there
    assert sorted(on_disk) == list(range(1, len(on_disk) + 1))  # and no gaps
    assert verify(entries, [], PUB).ok


def test_the_shipper_refuses_to_ship_over_foreign_entries(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from bastion.audit.shipper import Shipper
    from bastion.audit.store import AuditStoreError, entry_row
    from bastion.store.db import make_engine, upgrade
    from bastion.store.schema import audit_entries

    db = make_engine(f"sqlite:///{tmp_path}/s.db")
    upgrade(db)
    log = AuditLog(tmp_path / "wal", "gw-a")

    async def write(n: int) -> None:
        for i in range(n):
            await log.append({"request_id": f"r{i}"})

    asyncio.run(write(3))
    Shipper(db, tmp_path / "wal", "gw-a", lambda: log.durable).ship_once()
    # A repeat of the same shipment (a crash before it was noted) is harmless.
    assert Shipper(db, tmp_path / "wal", "gw-a", lambda: log.durable).ship_once() == 3
    # An insider plants entry 4 before the gateway writes it.
    forged = {"replica": "gw-a", "seq": 4, "ts": "2026-01-01T00:00:00+00:00", "hash": "f" * 64}
    with db.begin() as conn:
        conn.execute(audit_entries.insert(), entry_row(forged))
    asyncio.run(write(2))
    shipper = Shipper(db, tmp_path / "wal", "gw-a", lambda: log.durable)
    with pytest.raises(AuditStoreError, match="gw-a#4"):
        shipper.ship_once()
    log.close()
    with db.connect() as conn:
        seqs = [s for (s,) in conn.execute(sa.select(audit_entries.c.seq))]
    assert sorted(seqs) == [1, 2, 3, 4] and read_entries(tmp_path / "wal")  # evidence kept


def test_segments_rotate_in_the_sync_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SEGMENT_BYTES a new segment starts; the caller's thread never flushes to disk."""
    import threading

    from bastion.audit import wal

    monkeypatch.setattr(wal, "SEGMENT_BYTES", 4096)
    flushed_by: set[str] = set()
    real = os.fdatasync

    def spy(fd: int) -> None:
        flushed_by.add(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    shipped: list[tuple[str, int]] = []
    log = AuditLog(tmp_path, "gw-r")
    log.on_durable = lambda seg, size: shipped.append((seg.name, size))

    async def write() -> None:
        for i in range(300):
            await log.append({"request_id": f"r{i}", "pad": "x" * 100}, durable=i % 3 == 0)

    asyncio.run(write())
    assert flushed_by == {"bastion-audit-sync"}  # appends (in this thread) never flushed
    log.close()
    segs = wal.segments(tmp_path, "gw-r")
    assert len(segs) > 5
    entries = read_entries(tmp_path)
    assert [e["seq"] for e in entries] == list(range(1, 301)) and verify(entries, [], PUB).ok
    # every finished segment was reported whole, so the shipper can delete it
    for seg in segs[:-1]:
        assert (seg.name, seg.stat().st_size) in shipped


def test_time_follows_the_wall_clock_and_records_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock is read for every entry (an NTP correction is followed), never goes
    back within a chain, and a step of more than a second is recorded in the entry."""
    from datetime import datetime

    log = AuditLog(tmp_path, "gw-a")
    real = time.time

    async def stamped(offset: float) -> dict[str, object]:
        monkeypatch.setattr(time, "time", lambda: real() + offset)
        return await log.append({"request_id": f"r{offset}"})

    try:
        first = asyncio.run(stamped(0))
        ahead = asyncio.run(stamped(300))  # NTP steps the clock forward 5 minutes
        behind = asyncio.run(stamped(100))  # ... then back by 200 s
    finally:
        monkeypatch.setattr(time, "time", real)
        log.close()
    t0, t1, t2 = (datetime.fromisoformat(str(e["ts"])).timestamp() for e in (first, ahead, behind))
    assert "clock_step_s" not in first
    assert 299 < t1 - t0 < 310 and 299 < float(ahead["clock_step_s"]) < 301  # type: ignore[arg-type]
    assert t2 == t1 and -201 < float(behind["clock_step_s"]) < -199  # type: ignore[arg-type]


def test_ship_signs_the_head_a_crashed_replica_left_unsigned(tmp_path: Path) -> None:
    from bastion.audit.chain import public_key_hex
    from bastion.audit.wal import read_lines, segments

    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path, "gw-a", signing_key=key, checkpoint_entries=100)

    async def write() -> None:
        for i in range(3):
            await log.append({"request_id": f"r{i}"})

    asyncio.run(write())
    log.signing_key = None  # dies before its next checkpoint: nothing signs the tail
    log.close()
    assert not any("checkpoint" in x for s in segments(tmp_path) for x in read_lines(s))
    again = AuditLog(tmp_path, "gw-a", signing_key=key)  # what `bastion audit ship` does
    assert again.sign_head()
    again.close()
    cps = [x["checkpoint"] for s in segments(tmp_path) for x in read_lines(s) if "checkpoint" in x]
    entries = read_entries(tmp_path)
    pub = bytes.fromhex(public_key_hex(key))
    verdict = verify(entries, cps, pub, max_unsigned_seconds=1)
    assert verdict.ok and verdict.unsigned == 0 and cps[0]["seq"] == 3, verdict
