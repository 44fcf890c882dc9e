"""`bastion audit verify`: recompute every chain and check every signed checkpoint.

Trust comes only from outside the data: the public keys in `audit.trusted_public_keys` and any
given on the command line. No key file next to the data is trusted (whoever can replace the
data can replace that file), so a checkpoint signed by any other key fails. Beyond the chains:
- each stored row's searchable columns must equal the hashed entry (no re-attribution);
- the external anchor's signed heads must all be present (no deleted chain or cut tail), and
  every chain older than its newest manifest must be named in it (no added chain);
- the unsigned tail is bounded (`audit.max_unsigned_seconds`);
- a missing sealed content must be covered by a recorded purge;
- an export's plaintext must match the commitment in its hashed entry.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bastion.audit import anchor, store
from bastion.audit.chain import Verdict, Verifier, canonical
from bastion.audit.reader import EXPORT_FORMAT, EXPORT_VERSION, read_export
from bastion.audit.settings import AuditSettings


def trusted_keys(settings: AuditSettings, *extra: str | None) -> list[str]:
    """The configured keys and those given on the command line; nothing else."""
    return sorted({k for k in (*extra, *settings.trusted_public_keys) if k})


def _keys(trust: list[str]) -> list[bytes]:
    try:
        return [bytes.fromhex(k) for k in trust]
    except ValueError:
        raise ValueError("a trusted public key is not hex (64 hex digits expected)") from None


def verify_store(
    db: Engine,
    trust: list[str],
    since: datetime | None = None,
    anchor_dir: Path | None = None,
    max_unsigned_seconds: float | None = None,
) -> Verdict:
    """`anchor_dir`: the external anchor to hold the store to (AnchorError if unreadable)."""
    anchored = anchor.read(anchor_dir, set(trust)) if anchor_dir is not None else None
    v = Verifier(
        store.checkpoints(db),
        _keys(trust),
        anchored=since is not None,
        witnesses=anchored.witnesses if anchored else (),
        max_unsigned_seconds=max_unsigned_seconds,
        replica_set=anchored.replica_set if anchored else None,
    )
    # A column that disagrees is reported once the chains are through: a broken chain (an
    # inserted or moved entry drags its columns along) is the more telling finding.
    mismatch: tuple[str, int, str] | None = None
    for row in store.iter_rows(db, since):
        entry = store.row_entry(row)
        if not v.feed(entry):
            break
        if mismatch is None and (column := store.column_mismatch(row, entry)) is not None:
            mismatch = (row.replica, row.seq, column)
    verdict = v.result()
    if verdict.ok and mismatch is not None:
        v.failure = None
        v.broken(
            mismatch[0],
            mismatch[1],
            f"the stored `{mismatch[2]}` column differs from the hashed entry (re-attributed)",
        )
        return v.failure  # type: ignore[return-value]
    return verdict


def verify_file(path: Path, trust: list[str]) -> Verdict:
    with open(path, "rb") as f:
        header, lines, cps = read_export(iter(f))
    legacy = bool(header) and "format" not in header  # before the format was versioned
    if not legacy and (
        header.get("format") != EXPORT_FORMAT or header.get("version") != EXPORT_VERSION
    ):
        raise ValueError(
            f"{path}: not a {EXPORT_FORMAT} version {EXPORT_VERSION} export "
            f"(found {header.get('format')!r} version {header.get('version')!r})"
        )
    v = Verifier(cps, _keys(trust), anchored=True)
    for line in lines:
        entry = line["entry"]
        if (why := _plaintext_mismatch(line)) is not None:
            if why == "unbound":
                v.unbound += 1
            else:
                v.broken(entry.get("replica"), entry.get("seq"), why)
                break
        if not v.feed(entry, withheld=bool(line.get("withheld") or line.get("purged"))):
            break
    return v.result()


def _plaintext_mismatch(line: dict[str, Any]) -> str | None:
    """An exported plaintext must open the commitment in its hashed entry."""
    if line.get("plaintext") is None:
        return None
    commit = line["entry"].get("content_commit")
    if commit is None:
        return "unbound"  # recorded before commitments existed
    salt = base64.b64decode(str(line.get("salt", "")))
    if hashlib.sha256(salt + canonical(line["plaintext"])).hexdigest() != commit:
        return "the exported plaintext does not match the sealed content's commitment (edited)"
    return None
