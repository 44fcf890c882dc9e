"""Reading the trail back: search with decryption, one request's story, verifiable exports.

Only the auditor-facing API and CLI call this, and each of their reads is itself recorded.
Metadata filters run in the database; full-text search decrypts the candidates (newest first,
at most `scan` of them), since contents are only ever stored sealed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Engine, select

from bastion.audit import store
from bastion.audit.chain import canonical
from bastion.audit.crypto import ContentUnavailable, KeyWrapper, commitment, open_sealed
from bastion.audit.trail import seal_context
from bastion.store.schema import audit_entries

#: The evidence format (docs/audit.md, "Evidence format"; schema: evidence.schema.json).
EXPORT_FORMAT = "bastion-audit-export"
EXPORT_VERSION = 1
FILTERS = ("team", "user", "key_id", "model", "status", "kind", "request_id")


@dataclass
class Query:
    since: datetime | None = None
    until: datetime | None = None
    team: str | None = None
    user: str | None = None
    key_id: str | None = None
    model: str | None = None
    status: int | None = None
    kind: str | None = None
    request_id: str | None = None
    text: str | None = None
    limit: int = 100
    scan: int = 5000


class Decryptor:
    """Opens sealed contents, unwrapping each data key once per read."""

    def __init__(self, db: Engine, wrapper: KeyWrapper):
        self.db, self.wrapper = db, wrapper
        self.keys: dict[str, bytes | None] = {}

    def content(self, entry: dict[str, Any], sealed: bytes | None) -> dict[str, Any]:
        if "content_sha256" not in entry:
            return {"content": None}
        if sealed is None:
            return {"content": None, "content_unavailable": "purged (retention expired)"}
        key_id = str(entry.get("content_key"))
        try:
            if key_id not in self.keys:
                self.keys.update(store.data_keys(self.db, [key_id], self.wrapper))
            plain = open_sealed(self.keys.get(key_id), sealed, seal_context(entry))
        except ContentUnavailable as exc:
            return {"content": None, "content_unavailable": str(exc)}
        return {"content": orjson.loads(plain)}

    def salt(self, entry: dict[str, Any], plaintext: Any) -> str | None:
        """The commitment's salt, which lets anyone holding the plaintext check it."""
        key = self.keys.get(str(entry.get("content_key")))
        if key is None or "content_commit" not in entry:
            return None
        _commit, salt = commitment(key, seal_context(entry), canonical(plaintext))
        return base64.b64encode(salt).decode()


def search(db: Engine, wrapper: KeyWrapper, q: Query) -> dict[str, Any]:
    t = audit_entries
    stmt = select(t.c.doc, t.c.content).order_by(t.c.ts.desc(), t.c.seq.desc())
    if q.since is not None:
        stmt = stmt.where(t.c.ts >= q.since)
    if q.until is not None:
        stmt = stmt.where(t.c.ts < q.until)
    for name in FILTERS:
        if (value := getattr(q, name)) is not None:
            stmt = stmt.where(t.c[name] == value)
    stmt = stmt.limit(q.scan if q.text else q.limit)
    with db.connect() as conn:
        rows = conn.execute(stmt).all()
    dec = Decryptor(db, wrapper)
    needle = q.text.casefold() if q.text else None
    found = []
    for row in rows:
        entry = orjson.loads(row.doc)
        opened = dec.content(entry, row.content)
        if needle is not None:
            if opened["content"] is None:
                continue
            if needle not in orjson.dumps(opened["content"]).decode().casefold():
                continue
        found.append({**entry, **opened})
        if len(found) >= q.limit:
            break
    return {"data": found, "scanned": len(rows), "truncated": len(rows) >= q.scan}


def export(
    db: Engine,
    wrapper: KeyWrapper,
    trusted: list[str],
    since: datetime | None = None,
    until: datetime | None = None,
    team: str | None = None,
) -> Iterator[bytes]:
    """JSON lines: a header, then every entry of the range (extended to the next signed
    checkpoint, so the range's end is covered by a signature) and those checkpoints.
    Each entry keeps its sealed content and hash; `plaintext` is added for entries of `team`
    (all teams if none), so an export is readable and verifiable offline with the public key."""
    cps = store.checkpoints(db)
    cp_seqs: dict[str, list[int]] = {}
    for cp in cps:
        cp_seqs.setdefault(cp["replica"], []).append(cp["seq"])
    yield _line(
        {
            "export": {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None,
                "team": team,
                "trusted_public_keys": trusted,
            }
        }
    )
    dec = Decryptor(db, wrapper)
    ranges: dict[str, tuple[int, int]] = {}
    replica, stop_at = None, None
    for entry in store.iter_entries(db, since):
        r, seq = entry["replica"], entry["seq"]
        if r != replica:
            replica, stop_at = r, None
        past_end = until is not None and datetime.fromisoformat(entry["ts"]) >= until
        if past_end and stop_at is None:
            stop_at = next((s for s in sorted(cp_seqs.get(r, [])) if s >= seq - 1), seq - 1)
        if stop_at is not None and seq > stop_at:
            continue
        first, _last = ranges.get(r, (seq, seq))
        ranges[r] = (first, seq)
        line: dict[str, Any] = {"entry": entry}
        if team is None or entry.get("team") == team:
            sealed = entry.get("content")
            line["plaintext"] = dec.content(
                entry, base64.b64decode(sealed) if sealed is not None else None
            )["content"]
            if line["plaintext"] is not None and (salt := dec.salt(entry, line["plaintext"])):
                line["salt"] = salt
            if sealed is None and "content_sha256" in entry:
                line["purged"] = True  # the store's verify checks the purge was recorded
        elif entry.pop("content", None) is not None:  # another team's: only its digest
            line["withheld"] = True
        yield _line(line)
    for cp in cps:
        r = cp["replica"]
        if r in ranges and ranges[r][0] <= cp["seq"] <= ranges[r][1]:
            yield _line({"checkpoint": cp})


def _line(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) + b"\n"


def read_export(
    lines: Iterator[bytes],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(header, entry lines in (replica, seq) order, checkpoints)."""
    header: dict[str, Any] = {}
    entries, cps = [], []
    for raw in lines:
        if not raw.strip():
            continue
        obj = orjson.loads(raw)
        if "entry" in obj:
            entries.append(obj)
        elif "checkpoint" in obj:
            cps.append(obj["checkpoint"])
        elif "export" in obj:
            header = obj["export"]
    entries.sort(
        key=lambda line: (str(line["entry"].get("replica")), line["entry"].get("seq") or 0)
    )
    return header, entries, cps
