"""Change sequences assigned by the database, so replicas never depend on a writer's clock.

Every write to a polled table (keys, sessions) takes the next number of its stream inside the
same transaction. The counter row stays locked until that transaction commits, so writers get
their numbers in commit order: a replica that has seen number N has seen every change up to N,
and polls for `change_seq > N` without any overlap window or clock.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from bastion.store.schema import change_counters

#: The streams; each has its row in `change_counters` from the migration that made it.
STREAMS = ("api_keys", "sessions")


def next_change(conn: Connection, stream: str) -> int:
    """The next number of `stream`; call inside the transaction that writes the change."""
    table = change_counters
    done = conn.execute(
        table.update().where(table.c.name == stream).values(value=table.c.value + 1)
    )
    if done.rowcount != 1:  # the migration creates every stream's row
        raise LookupError(f"no change counter {stream!r}: is the database migrated?")
    return int(conn.execute(select(table.c.value).where(table.c.name == stream)).scalar_one())
