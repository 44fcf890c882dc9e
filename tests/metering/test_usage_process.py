"""The usage writer process: a batch is stored once, whatever happens to the process."""

from __future__ import annotations

import os
import signal
import time

import pytest
import sqlalchemy as sa

from bastion.metering.usage import UsageWriter
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly
from tests.metering.test_rollups import make_records


def _stored(engine: sa.Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one()
        distinct = conn.execute(
            sa.select(sa.func.count(sa.distinct(usage.c.request_id)))
        ).scalar_one()
        rolled = conn.execute(sa.select(sa.func.sum(usage_hourly.c.requests))).scalar_one()
    return rows, distinct, int(rolled or 0)


def test_a_killed_writer_process_loses_and_repeats_nothing(engine: sa.Engine) -> None:
    recs = make_records(900, seed=11)
    writer = UsageWriter(engine, flush_seconds=0.02)
    assert writer._process is not None  # a file or server database: written by the process
    writer.open()
    for r in recs[:300]:
        writer.add(r)
    deadline = time.monotonic() + 60
    while writer.written < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.written == 300
    proc = writer._process._proc
    assert proc is not None and proc.pid != os.getpid()
    os.kill(proc.pid, signal.SIGKILL)  # between batches: the next one finds it gone
    proc.join(10)
    for r in recs[300:]:
        writer.add(r)
    writer.close()
    assert writer.written == 900
    assert _stored(engine) == (900, 900, 900)


@pytest.mark.postgres
def test_a_refused_batch_is_retried_not_dropped(pg_url: str) -> None:
    """The process answers with the database's error; the thread keeps the batch and retries."""
    engine = make_engine(pg_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(usage.delete())
        conn.execute(usage_hourly.delete())
        conn.exec_driver_sql("ALTER TABLE usage ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    writer = UsageWriter(engine, flush_seconds=0.02)
    writer.open()
    try:
        for r in make_records(50, seed=12):
            writer.add(r)
        time.sleep(1.0)
        assert writer.written == 0  # refused, and kept
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE usage DROP CONSTRAINT refuse_all")
    writer.close()
    assert writer.written == 50
    assert _stored(engine) == (50, 50, 50)
    engine.dispose()
