"""The audit trail in the database: entries, checkpoints, team data keys and legal holds.

Writes are idempotent by (replica, seq), so the shipper can deliver at least once. Nothing here
edits an entry: the only changes after insertion are purging expired `content` (its digest
stays in the chained entry) and destroying a team's data key (crypto-shredding).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, and_, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Insert

from bastion.audit.crypto import KeyWrapper, new_data_key
from bastion.store.schema import audit_checkpoints, audit_entries, audit_holds, audit_keys


class AuditStoreError(Exception):
    """An audit operation is refused (e.g. shredding a team under legal hold)."""


def _insert(conn: Connection, table: Any) -> Insert:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)  # type: ignore[no-any-return]


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def entry_row(entry: dict[str, Any]) -> dict[str, Any]:
    sealed = entry.get("content")
    doc = {k: v for k, v in entry.items() if k != "content"}
    return {
        "replica": entry["replica"],
        "seq": entry["seq"],
        "kind": entry.get("kind", "?"),
        "request_id": entry.get("request_id"),
        "ts": datetime.fromisoformat(entry["ts"]),
        "team": entry.get("team"),
        "user": entry.get("user"),
        "key_id": entry.get("key_id"),
        "model": entry.get("model"),
        "status": entry.get("status"),
        "doc": orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode(),
        "content": base64.b64decode(sealed) if sealed is not None else None,
    }


def insert_lines(conn: Connection, lines: Iterable[dict[str, Any]]) -> int:
    """Stores WAL lines (entries and checkpoints); already stored ones are skipped."""
    entries, cps = [], []
    for obj in lines:
        if "checkpoint" in obj:
            cps.append({**obj["checkpoint"], "public_key": obj["checkpoint"]["key"]})
        else:
            entries.append(entry_row(obj))
    if entries:
        stmt = _insert(conn, audit_entries).on_conflict_do_nothing()
        inserted = conn.execute(stmt, entries).rowcount
        if inserted != len(entries):  # a re-shipment, or something else already sits there
            _check_same(conn, entries)
    if cps:
        rows = [{c.name: cp[c.name] for c in audit_checkpoints.columns} for cp in cps]
        conn.execute(_insert(conn, audit_checkpoints).on_conflict_do_nothing(), rows)
    return len(entries)


def _check_same(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Entries already stored must be the very ones being shipped: anything else means the
    store was written by someone else, and the shipment stops (the log keeps the evidence)."""
    by_replica: dict[str, dict[int, str]] = {}
    for r in rows:
        by_replica.setdefault(r["replica"], {})[r["seq"]] = orjson.loads(r["doc"])["hash"]
    for replica, hashes in by_replica.items():
        stored = conn.execute(
            select(audit_entries.c.seq, audit_entries.c.doc).where(
                audit_entries.c.replica == replica,
                audit_entries.c.seq.between(min(hashes), max(hashes)),
            )
        )
        for seq, doc in stored:
            if seq in hashes and orjson.loads(doc).get("hash") != hashes[seq]:
                raise AuditStoreError(
                    f"the store holds a different entry at {replica}#{seq} than the log: "
                    "the audit store was written outside Bastion; shipping stops here"
                )


def row_entry(row: Any) -> dict[str, Any]:
    entry: dict[str, Any] = orjson.loads(row.doc)
    if row.content is not None:
        entry["content"] = base64.b64encode(row.content).decode()
    return entry


def checkpoints(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(audit_checkpoints)).all()
    out = []
    for r in rows:
        cp = {"replica": r.replica, "seq": r.seq, "head": r.head, "ts": r.ts}
        out.append({**cp, "key": r.public_key, "signature": r.signature})
    return out


#: The columns stored beside each entry for searching, each a copy of a field of the hashed
#: entry: `verify` checks they still are, so a search by team or user cannot be misled.
COLUMNS = (
    "replica",
    "seq",
    "kind",
    "request_id",
    "ts",
    "team",
    "user",
    "key_id",
    "model",
    "status",
)


def column_mismatch(row: Any, entry: dict[str, Any]) -> str | None:
    """The first searchable column that differs from the hashed entry, if any."""
    expected = entry_row(entry)
    for name in COLUMNS:
        stored, want = getattr(row, name), expected[name]
        if name == "ts":
            stored = _utc(stored) if isinstance(stored, datetime) else stored
            want = _utc(want)
        if stored != want:
            return name
    return None


def latest_checkpoints(db: Engine, per_replica: int = 8) -> list[dict[str, Any]]:
    """The newest few checkpoints of each replica (what a manifest needs; the table grows by
    thousands a day, so the anchor never reads all of it)."""
    t = audit_checkpoints
    out = []
    with db.connect() as conn:
        replicas = [r for (r,) in conn.execute(select(t.c.replica).distinct())]
        for replica in replicas:
            q = select(t).where(t.c.replica == replica).order_by(t.c.seq.desc()).limit(per_replica)
            for r in conn.execute(q):
                cp = {"replica": r.replica, "seq": r.seq, "head": r.head, "ts": r.ts}
                out.append({**cp, "key": r.public_key, "signature": r.signature})
    return out


def iter_entries(
    db: Engine, since: datetime | None = None, until: datetime | None = None, chunk: int = 5000
) -> Iterator[dict[str, Any]]:
    """Every entry in (replica, seq) order, read in chunks (keyset pagination)."""
    for row in iter_rows(db, since, until, chunk):
        yield row_entry(row)


def iter_rows(
    db: Engine, since: datetime | None = None, until: datetime | None = None, chunk: int = 5000
) -> Iterator[Any]:
    """Every stored row (entry and searchable columns) in (replica, seq) order."""
    with db.connect() as conn:
        replicas = [r for (r,) in conn.execute(select(audit_entries.c.replica).distinct())]
    for replica in sorted(replicas):
        start = 0
        if since is not None:
            with db.connect() as conn:
                first = conn.execute(
                    select(func.min(audit_entries.c.seq)).where(
                        audit_entries.c.replica == replica, audit_entries.c.ts >= since
                    )
                ).scalar()
            if first is None:
                continue
            start = first - 1
        while True:
            q = (
                select(audit_entries)
                .where(audit_entries.c.replica == replica, audit_entries.c.seq > start)
                .order_by(audit_entries.c.seq)
                .limit(chunk)
            )
            if until is not None:
                q = q.where(audit_entries.c.ts < until)
            with db.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                break
            yield from rows
            start = rows[-1].seq


def last_entry(db: Engine, replica: str) -> dict[str, Any] | None:
    """The replica's newest stored entry: where its chain resumes if its log is gone."""
    with db.connect() as conn:
        row = conn.execute(
            select(audit_entries.c.doc)
            .where(audit_entries.c.replica == replica)
            .order_by(audit_entries.c.seq.desc())
            .limit(1)
        ).first()
    return orjson.loads(row.doc) if row is not None else None


def open_requests(db: Engine, replica: str) -> list[dict[str, Any]]:
    """Request entries of this replica's last lifetime that have no completion (a crash)."""
    e, c = audit_entries, audit_entries.alias("c")
    with db.connect() as conn:
        last_start = conn.execute(
            select(func.max(e.c.seq)).where(e.c.replica == replica, e.c.kind == "start")
        ).scalar()
        q = select(e.c.doc).where(
            e.c.replica == replica,
            e.c.kind == "request",
            e.c.seq > (last_start or 0),
            ~exists().where(and_(c.c.request_id == e.c.request_id, c.c.kind == "completion")),
        )
        return [orjson.loads(doc) for (doc,) in conn.execute(q)]


# -- team data keys -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DataKey:
    id: str
    team: str
    key: bytes


def current_key(db: Engine, team: str, wrapper: KeyWrapper) -> DataKey:
    """The team's live data key, created (and stored wrapped) if it has none."""
    with db.begin() as conn:
        row = conn.execute(
            select(audit_keys.c.id, audit_keys.c.wrapped)
            .where(audit_keys.c.team == team, audit_keys.c.destroyed_at.is_(None))
            .order_by(audit_keys.c.created_at.desc())
            .limit(1)
        ).first()
        if row is not None:
            return DataKey(row.id, team, wrapper.unwrap(row.wrapped, team))
        key = new_data_key()
        key_id = "dk_" + secrets.token_hex(8)
        conn.execute(
            audit_keys.insert(),
            {
                "id": key_id,
                "team": team,
                "wrapped": wrapper.wrap(key, team),
                "created_at": datetime.now(UTC),
                "destroyed_at": None,
            },
        )
        return DataKey(key_id, team, key)


def current_key_ids(db: Engine) -> dict[str, str]:
    """Per team, the id of the data key new contents are sealed with (its newest live one)."""
    with db.connect() as conn:
        q = (
            select(audit_keys.c.team, audit_keys.c.id)
            .where(audit_keys.c.destroyed_at.is_(None))
            .order_by(audit_keys.c.created_at)
        )
        return {team: key_id for team, key_id in conn.execute(q)}


def rotate_team_key(db: Engine, team: str, wrapper: KeyWrapper) -> str:
    """A fresh data key for the team, used for everything sealed from now on; the older ones
    stay (wrapped) to read what they sealed, until the team is shredded."""
    key_id = "dk_" + secrets.token_hex(8)
    with db.begin() as conn:
        conn.execute(
            audit_keys.insert(),
            {
                "id": key_id,
                "team": team,
                "wrapped": wrapper.wrap(new_data_key(), team),
                "created_at": datetime.now(UTC),
                "destroyed_at": None,
            },
        )
    return key_id


def data_keys(db: Engine, ids: Iterable[str], wrapper: KeyWrapper) -> dict[str, bytes | None]:
    """Unwrapped data keys by id; None for destroyed (shredded) ones."""
    wanted = set(ids)
    if not wanted:
        return {}
    with db.connect() as conn:
        rows = conn.execute(select(audit_keys).where(audit_keys.c.id.in_(wanted))).all()
    found: dict[str, bytes | None] = {i: None for i in wanted}
    for r in rows:
        if r.wrapped is not None:
            found[r.id] = wrapper.unwrap(r.wrapped, r.team)
    return found


# -- legal holds, shredding, retention -----------------------------------------------------------
def holds(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(audit_holds).order_by(audit_holds.c.team)).all()
    return [
        {
            "team": r.team,
            "reason": r.reason,
            "placed_by": r.placed_by,
            "placed_at": _utc(r.placed_at).isoformat(),
        }
        for r in rows
    ]


def place_hold(db: Engine, team: str, reason: str, actor: str) -> bool:
    """True if placed; False if the team was already on hold."""
    row = {"team": team, "reason": reason, "placed_by": actor, "placed_at": datetime.now(UTC)}
    with db.begin() as conn:
        result = conn.execute(_insert(conn, audit_holds).on_conflict_do_nothing(), row)
        return bool(result.rowcount)


def release_hold(db: Engine, team: str) -> bool:
    with db.begin() as conn:
        return bool(conn.execute(delete(audit_holds).where(audit_holds.c.team == team)).rowcount)


def _on_hold(conn: Connection, team: str) -> bool:
    return (
        conn.execute(select(audit_holds.c.team).where(audit_holds.c.team == team)).first()
        is not None
    )


def on_hold(db: Engine, team: str) -> bool:
    with db.connect() as conn:
        return _on_hold(conn, team)


def newest_content(db: Engine, team: str) -> datetime | None:
    """When the team's newest still-readable content was recorded (None: there is none)."""
    q = select(func.max(audit_entries.c.ts)).where(
        (audit_entries.c.team == team) & audit_entries.c.content.is_not(None)
    )
    with db.connect() as conn:
        newest = conn.execute(q).scalar()
    return _utc(newest) if newest is not None else None


def shred(db: Engine, team: str) -> int:
    """Destroys every data key of the team; returns how many. Refused under legal hold."""
    with db.begin() as conn:
        if _on_hold(conn, team):
            raise AuditStoreError(f"team {team!r} is under legal hold: its audit trail is kept")
        result = conn.execute(
            update(audit_keys)
            .where(audit_keys.c.team == team, audit_keys.c.destroyed_at.is_(None))
            .values(wrapped=None, destroyed_at=datetime.now(UTC))
        )
        return int(result.rowcount)


def purge_cutoffs(
    db: Engine, retention: dict[str | None, int], now: datetime | None = None
) -> dict[str, str]:
    """Per team (not on hold), the time before which contents are past retention (None in
    `retention`: the default). Recorded in the purge's own entry before anything is dropped:
    that entry is what lets `verify` tell a purge from contents deleted in the database."""
    now = now or datetime.now(UTC)
    with db.connect() as conn:
        held = {t for (t,) in conn.execute(select(audit_holds.c.team))}
        teams = {t for (t,) in conn.execute(select(audit_entries.c.team).distinct()) if t}
    out = {}
    for team in sorted(teams - held):
        days = retention.get(team, retention.get(None))
        if days is not None:
            out[team] = (now - timedelta(days=days)).isoformat()
    return out


def purge(db: Engine, cutoffs: dict[str, str]) -> dict[str, int]:
    """Drops the sealed contents older than each team's recorded cutoff; holds still win."""
    now = datetime.now(UTC)
    out: dict[str, int] = {}
    with db.begin() as conn:
        held = {t for (t,) in conn.execute(select(audit_holds.c.team))}
        for team, cutoff in sorted(cutoffs.items()):
            if team in held:
                continue
            result = conn.execute(
                update(audit_entries)
                .where(
                    audit_entries.c.team == team,
                    audit_entries.c.ts < datetime.fromisoformat(cutoff),
                    audit_entries.c.content.is_not(None),
                )
                .values(content=None, purged_at=now)
            )
            if result.rowcount:
                out[team] = int(result.rowcount)
    return out
