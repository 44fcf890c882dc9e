"""How fast the audit shipper moves entries from the local log into the store.

Writes N realistic entries (request + completion pairs, ~1 KB sealed content each) through
the real write-ahead log, then times `Shipper.ship_once` into SQLite and into PostgreSQL, and
prints entries/s side by side with a plain batched INSERT of the same rows (the baseline).

    .venv/bin/python -m bench.audit_shipper --entries 50000 \
        --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Unlike ``bench.overhead`` this imports Bastion: run it with the project's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bastion.audit.chain import content_digest
from bastion.audit.shipper import Shipper
from bastion.audit.store import entry_row
from bastion.audit.wal import AuditLog, read_entries
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import audit_entries


def fill(directory: Path, n: int) -> None:
    log = AuditLog(directory, "bench")

    async def write() -> None:
        batch = []
        for i in range(n):
            sealed = os.urandom(1024)
            batch.append(
                log.append(
                    {
                        "kind": "request" if i % 2 == 0 else "completion",
                        "request_id": f"req_{i // 2:012d}",
                        "team": f"team-{i % 7}",
                        "user": f"user-{i % 97}",
                        "key_id": "key_0123456789abcdef",
                        "model": "tiny",
                        "status": 200,
                        "content": base64.b64encode(sealed).decode(),
                        "content_sha256": content_digest(sealed),
                        "content_key": "dk_0123456789abcdef",
                    }
                )
            )
            if len(batch) == 512:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)

    asyncio.run(write())
    log.close()


def fresh_db(url: str, work: Path, name: str) -> tuple[sa.Engine, str | None]:
    """A new, migrated store; for PostgreSQL a throw-away database (returned to drop)."""
    if url == "sqlite":
        engine = make_engine(f"sqlite:///{work / name}.db")
        upgrade(engine)
        return engine, None
    db = f"bastion_bench_{secrets.token_hex(4)}"
    _admin(url, f'CREATE DATABASE "{db}"')
    engine = make_engine(url.rsplit("/", 1)[0] + "/" + db)
    upgrade(engine)
    return engine, db


def _admin(url: str, sql: str) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(sql))
    admin.dispose()


def drop(engine: sa.Engine, url: str, db: str | None) -> None:
    engine.dispose()
    if db is not None:
        _admin(url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def bench(target: str, source: Path, work: Path, n: int) -> tuple[float, float]:
    # Baseline: the same rows, already parsed, inserted 2,000 per transaction.
    rows = [entry_row(e) for e in read_entries(source, "bench")]
    engine, db = fresh_db(target, work, "baseline")
    t0 = time.perf_counter()
    for i in range(0, len(rows), 2000):
        with engine.begin() as conn:
            conn.execute(audit_entries.insert(), rows[i : i + 2000])
    baseline = n / (time.perf_counter() - t0)
    drop(engine, target, db)
    # The shipper: reads the segments, parses, inserts idempotently, deletes shipped segments.
    copy = work / f"wal-{target.split(':')[0]}"
    copy.mkdir()
    for seg in source.glob("*.wal"):
        (copy / seg.name).write_bytes(seg.read_bytes())
    engine, db = fresh_db(target, work, "shipper")
    t0 = time.perf_counter()
    shipped = Shipper(engine, copy, "bench").ship_once()
    rate = shipped / (time.perf_counter() - t0)
    assert shipped == n, (shipped, n)
    drop(engine, target, db)
    return rate, baseline


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.audit_shipper", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--pg", help="PostgreSQL admin URL (a throw-away database is created)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "wal"
        t0 = time.perf_counter()
        fill(source, args.entries)
        print(f"wrote {args.entries} entries through the WAL in {time.perf_counter() - t0:.1f} s")
        targets = ["sqlite"] + ([args.pg] if args.pg else [])
        print(f"{'store':<12}{'shipper/s':>12}{'baseline/s':>12}{'ratio':>8}{'vs 5,000/s':>12}")
        for target in targets:
            rate, baseline = bench(target, source, work, args.entries)
            name = "sqlite" if target == "sqlite" else "postgresql"
            print(
                f"{name:<12}{rate:>12,.0f}{baseline:>12,.0f}{rate / baseline:>8.2f}"
                f"{rate / 5000:>11.1f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
