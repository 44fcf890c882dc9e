"""The audit trail's tamper evidence: a hash chain per gateway replica, with signed checkpoints.

Each entry carries its replica id, a gap-free sequence number, the hash of the previous entry
and its own hash over its canonical form (sorted-key compact JSON). The sealed prompt/response
(`content`) is kept out of that form and covered by its SHA-256 (`content_sha256`) instead, so
expired contents can be purged while every hash still verifies. Every so often a checkpoint
signs the chain head with Ed25519. Editing, deleting, inserting or reordering entries breaks
the chain at a definite sequence number; replacing the whole chain needs the signing key.
The verifier also holds the chains to heads anchored outside the database (anchor.py), bounds
the unsigned tail, and accepts a missing sealed content only where a recorded purge covers it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

GENESIS = "0" * 64


def canonical(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the entry's canonical form without its own `hash` and sealed `content`."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "content")}
    return hashlib.sha256(canonical(body)).hexdigest()


def content_digest(sealed: bytes) -> str:
    return hashlib.sha256(sealed).hexdigest()


class Chain:
    """Appends entries to one replica's chain (single writer: the replica's audit log)."""

    def __init__(self, replica: str, last_seq: int = 0, last_hash: str = GENESIS):
        self.replica = replica
        self.seq = last_seq
        self.head = last_hash

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        entry = {**record, "replica": self.replica, "seq": self.seq + 1, "prev": self.head}
        entry["hash"] = entry_hash(entry)
        self.seq, self.head = entry["seq"], entry["hash"]
        return entry

    def checkpoint(self, key: Ed25519PrivateKey, ts: str) -> dict[str, Any]:
        cp = {
            "replica": self.replica,
            "seq": self.seq,
            "head": self.head,
            "ts": ts,
            "key": public_key_hex(key),
        }
        return {**cp, "signature": key.sign(canonical(cp)).hex()}


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """A clear PEM signing key (mode 0600), created on first use; returns (key, created).
    Tests and tools only: the gateway keeps its key wrapped (keys.load_signing_key)."""
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key, False
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return key, True


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    checkpoints: int
    #: The first (replica, seq) where the chain breaks, and why.
    replica: str | None = None
    seq: int | None = None
    reason: str | None = None
    #: Entries after their replica's last signed checkpoint or anchored head (not yet covered
    #: by a signature); bounded by `max_unsigned_seconds`.
    unsigned: int = 0
    replicas: int = 0
    #: Heads taken from the external anchor (signed manifests) and checked against the chains.
    anchored_heads: int = 0
    #: Exported plaintexts of entries written before plaintext commitments existed: shown, but
    #: not provably the sealed content.
    unbound_plaintexts: int = 0


def _ts(value: object) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class Verifier:
    """Checks entries streamed in (replica, seq) order against the signed checkpoints.

    `anchored`: a partial range (`--since`, an export) starts each replica at its first entry
    present, trusting that entry's `prev`; a whole trail must start at seq 1.
    `witnesses`: heads from the external anchor, already signature-checked (anchor.py): each
    must be present with that hash, so a deleted chain or a truncated tail fails.
    `max_unsigned_seconds`: entries not covered by a checkpoint or a witness may be at most
    this much older than the newest entry or manifest (a forged chain is never signed).
    """

    def __init__(
        self,
        checkpoints: Iterable[dict[str, Any]],
        trusted_keys: Iterable[bytes],
        anchored: bool = False,
        witnesses: Iterable[dict[str, Any]] = (),
        max_unsigned_seconds: float | None = None,
        replica_set: tuple[float, set[str]] | None = None,
    ):
        self.anchored = anchored
        self.trusted = {k.hex(): Ed25519PublicKey.from_public_bytes(k) for k in trusted_keys}
        self.checkpoints = list(checkpoints)
        self.due: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for cp in self.checkpoints:
            self.due.setdefault((str(cp.get("replica")), cp.get("seq")), []).append(cp)  # type: ignore[arg-type]
        self.witnessed = 0
        for w in witnesses:
            self.witnessed += 1
            self.due.setdefault((str(w["replica"]), int(w["seq"])), []).append(
                {**w, "witness": True}
            )
        self.max_unsigned = max_unsigned_seconds
        #: The newest manifest's time and the chains it names: older chains must be among them.
        self.replica_set = replica_set
        self.newest = replica_set[0] if replica_set else 0.0
        self.first_ts: dict[str, float] = {}
        self.last: dict[str, tuple[int, str]] = {}
        self.first: dict[str, int] = {}
        self.signed: dict[str, int] = {}
        #: Per replica, the first entry (seq, time) not yet covered by a signed head.
        self.unsigned_from: dict[str, tuple[int, float | None]] = {}
        #: Per team, the newest entry whose sealed content is gone, and where it is.
        self.nulled: dict[str, tuple[float, str, int]] = {}
        #: Per team, the cutoff of the newest recorded purge; legacy purges named no cutoff.
        self.purged_before: dict[str, float] = {}
        self.legacy_purge = 0.0
        self.unbound = 0
        self.count = 0
        self.failure: Verdict | None = None
        #: Gaps seen per replica (first, last missing): reordered if the missing entry comes next.
        self.gaps: dict[str, tuple[int, int]] = {}

    def broken(self, replica: object, seq: object, reason: str) -> None:
        at = seq if isinstance(seq, int) else None
        if self.failure is None:
            self.failure = Verdict(
                False, self.count, len(self.checkpoints), str(replica), at, reason
            )

    def feed(self, e: dict[str, Any], withheld: bool = False) -> bool:
        """Checks one more entry; False once the chain is broken (stop feeding). `withheld`:
        an export left this entry's sealed content out on purpose (another team's)."""
        if self.failure is not None:
            return False
        self.count += 1
        replica, seq = str(e.get("replica")), e.get("seq")
        if (gap := self.gaps.get(replica)) is not None:
            if seq == gap[0]:
                self.broken(replica, seq, "entries are out of order (reordered)")
            else:
                self.broken(replica, gap[0], _missing(gap))
            return False
        if replica not in self.last and self.anchored and isinstance(seq, int):
            self.last[replica] = (seq - 1, str(e.get("prev")))
        last_seq, last_hash = self.last.get(replica, (0, GENESIS))
        self.first.setdefault(replica, last_seq + 1)
        if not isinstance(seq, int) or seq <= last_seq:
            self.broken(replica, seq, f"entry inserted or out of order after seq {last_seq}")
        elif seq != last_seq + 1:
            self.gaps[replica] = (last_seq + 1, seq - 1)
            return True  # decided by the next entry: the missing one (reordered) or not
        elif entry_hash(e) != e.get("hash"):
            self.broken(replica, seq, "entry content does not match its hash (edited)")
        elif e.get("prev") != last_hash:
            self.broken(
                replica,
                seq,
                f"entry does not follow the previous one (entry {seq - 1} was inserted or "
                "replaced)",
            )
        elif (sealed := e.get("content")) is not None and content_digest(
            sealed if isinstance(sealed, bytes) else base64.b64decode(sealed)
        ) != e.get("content_sha256"):
            self.broken(replica, seq, "sealed content does not match its digest (edited)")
        if self.failure is not None:
            return False
        self._account(e, replica, seq, withheld)  # type: ignore[arg-type]
        self.last[replica] = (seq, e["hash"])  # type: ignore[assignment]
        for cp in self.due.pop((replica, seq), ()):  # type: ignore[arg-type]
            self._checkpoint(cp, e["hash"])
        return self.failure is None

    def _account(self, e: dict[str, Any], replica: str, seq: int, withheld: bool) -> None:
        """What is settled only at the end: unsigned tails, and removed contents (a recorded
        purge, possibly on another chain, may explain them)."""
        ts = _ts(e.get("ts"))
        if ts is not None:
            self.newest = max(self.newest, ts)
            self.first_ts.setdefault(replica, ts)
        self.unsigned_from.setdefault(replica, (seq, ts))
        if e.get("content") is None and "content_sha256" in e and not withheld:
            team = str(e.get("team"))
            if ts is None or ts >= self.nulled.get(team, (-1.0,))[0]:
                self.nulled[team] = (ts if ts is not None else float("inf"), replica, seq)
        if e.get("kind") == "admin" and e.get("action") == "audit.purge" and ts is not None:
            cutoffs = (e.get("after") or {}).get("cutoffs")
            if isinstance(cutoffs, dict):
                for team, cutoff in cutoffs.items():
                    if (c := _ts(cutoff)) is not None:
                        self.purged_before[team] = max(self.purged_before.get(team, 0.0), c)
            else:  # before cutoffs were recorded: retention is at least a day
                self.legacy_purge = max(self.legacy_purge, ts - 86400)

    def _checkpoint(self, cp: dict[str, Any], head: str | None) -> None:
        replica = str(cp.get("replica"))
        if not cp.get("witness"):
            body = {k: v for k, v in cp.items() if k != "signature"}
            pub = self.trusted.get(str(cp.get("key")))
            if pub is None:
                return self.broken(replica, cp.get("seq"), "checkpoint signed by an untrusted key")
            try:
                pub.verify(bytes.fromhex(str(cp.get("signature", ""))), canonical(body))
            except (InvalidSignature, ValueError):
                return self.broken(replica, cp.get("seq"), "checkpoint signature is invalid")
        if head is None and cp.get("witness"):
            if replica not in self.last:
                return self.broken(
                    replica,
                    cp.get("seq"),
                    "the whole chain is missing (deleted): the anchor holds its signed head",
                )
            return self.broken(
                replica,
                self.last[replica][0] + 1,
                f"entries up to seq {cp.get('seq')} are missing (truncated): the anchor holds "
                "a signed head beyond the stored chain",
            )
        if head != cp.get("head"):
            what = "anchored" if cp.get("witness") else "signed"
            return self.broken(
                replica,
                cp.get("seq"),
                f"the {what} chain head differs from the entries (entries rewritten or missing)",
            )
        self.signed[replica] = max(self.signed.get(replica, 0), int(cp["seq"]))
        if self.last.get(replica, (0,))[0] == int(cp["seq"]):
            self.unsigned_from.pop(replica, None)

    def result(self) -> Verdict:
        for replica, gap in sorted(self.gaps.items()):
            self.broken(replica, gap[0], _missing(gap))
        if self.failure is None:
            for (replica, seq), cps in sorted(self.due.items(), key=lambda kv: str(kv[0])):
                # Checkpoints before a partial range's start cannot be checked: not a failure.
                if self.anchored and (replica not in self.first or seq < self.first[replica]):
                    continue
                if replica not in self.last or seq > self.last[replica][0]:
                    self._checkpoint(cps[0], None)
                    break
        if self.failure is None:
            self._unsigned_tails()
        if self.failure is None:
            self._removed_contents()
        if self.failure is not None:
            return self.failure
        unsigned = sum(seq - self.signed.get(r, 0) for r, (seq, _h) in self.last.items())
        return Verdict(
            True,
            self.count,
            len(self.checkpoints),
            unsigned=unsigned,
            replicas=len(self.last),
            anchored_heads=self.witnessed,
            unbound_plaintexts=self.unbound,
        )

    def _unsigned_tails(self) -> None:
        if self.max_unsigned is None:
            return
        if self.replica_set is not None:
            at, named = self.replica_set
            for replica in sorted(set(self.last) - named):
                if self.first_ts.get(replica, at) < at - self.max_unsigned:
                    return self.broken(
                        replica,
                        self.first.get(replica),
                        "this chain is not in the newest signed manifest of the anchor, though "
                        "it is older (a chain added in the database)",
                    )
        for replica, (seq, ts) in sorted(self.unsigned_from.items()):
            if ts is not None and self.newest - ts > self.max_unsigned:
                return self.broken(
                    replica,
                    seq,
                    f"entries from here on were never signed by a trusted key, yet are over "
                    f"{self.max_unsigned:g}s older than the newest entry (a forged chain, or a "
                    "replica that stopped unsigned: `bastion audit ship` signs its head)",
                )

    def _removed_contents(self) -> None:
        for team, (ts, replica, seq) in sorted(self.nulled.items()):
            allowed = max(self.purged_before.get(team, 0.0), self.legacy_purge)
            if ts >= allowed:
                return self.broken(
                    replica,
                    seq,
                    "the sealed content was removed without a recorded purge covering it "
                    "(deleted in the database)",
                )


def _missing(gap: tuple[int, int]) -> str:
    return f"entries {gap[0]}..{gap[1]} are missing (deleted)"


def verify(
    entries: Iterable[dict[str, Any]],
    checkpoints: Iterable[dict[str, Any]],
    trusted_keys: bytes | Iterable[bytes],
    anchored: bool = False,
    **kw: Any,
) -> Verdict:
    """Verifies a whole trail given as entries in (replica, seq) order per replica."""
    keys = [trusted_keys] if isinstance(trusted_keys, bytes) else list(trusted_keys)
    v = Verifier(checkpoints, keys, anchored, **kw)
    for e in entries:
        if not v.feed(e):
            break
    return v.result()
