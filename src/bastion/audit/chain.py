"""The audit trail's tamper evidence: a hash chain per gateway replica, with signed checkpoints.

Each entry carries its replica id, a gap-free sequence number, the hash of the previous entry
and its own hash over its canonical form (sorted-key compact JSON). Every so often a checkpoint
signs the chain head with Ed25519. Editing, deleting, inserting or reordering entries breaks the
chain at a definite sequence number; replacing the whole chain needs the signing key.

This module is the first step of the audit trail (issue 3): the chain, the checkpoint keys and
`verify`. The write-ahead log, the shipper and the request-path wiring build on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
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
    """SHA-256 over the entry's canonical form without its own `hash` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


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
        cp = {"replica": self.replica, "seq": self.seq, "head": self.head, "ts": ts}
        return {**cp, "signature": key.sign(canonical(cp)).hex()}


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The signing key (PEM, mode 0600); created on first use. Returns (key, created)."""
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


def verify(
    entries: list[dict[str, Any]], checkpoints: list[dict[str, Any]], public_key: bytes
) -> Verdict:
    """Recomputes every replica's chain in stored order and checks every checkpoint."""
    pub = Ed25519PublicKey.from_public_bytes(public_key)

    def broken(replica: object, seq: object, reason: str) -> Verdict:
        at = seq if isinstance(seq, int) else None
        return Verdict(False, len(entries), len(checkpoints), str(replica), at, reason)

    present = {(str(e.get("replica")), e.get("seq")) for e in entries}
    heads: dict[tuple[str, int], str] = {}
    last: dict[str, tuple[int, str]] = {}
    for e in entries:
        replica, seq = str(e.get("replica")), e.get("seq")
        last_seq, last_hash = last.get(replica, (0, GENESIS))
        if not isinstance(seq, int) or seq <= last_seq:
            return broken(replica, seq, f"entry inserted or out of order after seq {last_seq}")
        if seq != last_seq + 1:
            if (replica, last_seq + 1) in present:
                return broken(replica, last_seq + 1, "entries are out of order (reordered)")
            return broken(
                replica, last_seq + 1, f"entries {last_seq + 1}..{seq - 1} are missing (deleted)"
            )
        if entry_hash(e) != e.get("hash"):
            return broken(replica, seq, "entry content does not match its hash (edited)")
        if e.get("prev") != last_hash:
            return broken(replica, seq, "entry does not follow the previous one (replaced)")
        last[replica] = (seq, e["hash"])
        heads[(replica, seq)] = e["hash"]
    for cp in checkpoints:
        body = {k: v for k, v in cp.items() if k != "signature"}
        try:
            pub.verify(bytes.fromhex(str(cp.get("signature", ""))), canonical(body))
        except (InvalidSignature, ValueError):
            return broken(cp.get("replica"), cp.get("seq"), "checkpoint signature is invalid")
        if heads.get((str(cp.get("replica")), cp.get("seq"))) != cp.get("head"):  # type: ignore[arg-type]
            return broken(
                cp.get("replica"),
                cp.get("seq"),
                "the signed chain head differs from the entries (entries rewritten or missing)",
            )
    return Verdict(True, len(entries), len(checkpoints))
