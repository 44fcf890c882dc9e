"""The audit trail's tamper evidence: a hash chain per gateway replica, with signed checkpoints.

Each entry carries its replica id, a gap-free sequence number, the hash of the previous entry
and its own hash over its canonical form (sorted-key compact JSON). The sealed prompt/response
(`content`) is kept out of that form and covered by its SHA-256 (`content_sha256`) instead, so
expired contents can be purged while every hash still verifies. Every so often a checkpoint
signs the chain head with Ed25519. Editing, deleting, inserting or reordering entries breaks
the chain at a definite sequence number; replacing the whole chain needs the signing key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
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
    #: Entries after their replica's last signed checkpoint (not yet covered by a signature).
    unsigned: int = 0
    replicas: int = 0


class Verifier:
    """Checks entries streamed in (replica, seq) order against the signed checkpoints.

    `anchored`: a partial range (`--since`, an export) starts each replica at its first entry
    present, trusting that entry's `prev`; a whole trail must start at seq 1.
    """

    def __init__(
        self,
        checkpoints: Iterable[dict[str, Any]],
        trusted_keys: Iterable[bytes],
        anchored: bool = False,
    ):
        self.anchored = anchored
        self.trusted = {k.hex(): Ed25519PublicKey.from_public_bytes(k) for k in trusted_keys}
        self.checkpoints = list(checkpoints)
        self.due: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for cp in self.checkpoints:
            self.due.setdefault((str(cp.get("replica")), cp.get("seq")), []).append(cp)  # type: ignore[arg-type]
        self.last: dict[str, tuple[int, str]] = {}
        self.first: dict[str, int] = {}
        self.signed: dict[str, int] = {}
        self.count = 0
        self.failure: Verdict | None = None
        #: Gaps seen per replica (first, last missing): reordered if the missing entry comes next.
        self.gaps: dict[str, tuple[int, int]] = {}

    def _broken(self, replica: object, seq: object, reason: str) -> None:
        at = seq if isinstance(seq, int) else None
        if self.failure is None:
            self.failure = Verdict(
                False, self.count, len(self.checkpoints), str(replica), at, reason
            )

    def feed(self, e: dict[str, Any]) -> bool:
        """Checks one more entry; False once the chain is broken (stop feeding)."""
        if self.failure is not None:
            return False
        self.count += 1
        replica, seq = str(e.get("replica")), e.get("seq")
        if (gap := self.gaps.get(replica)) is not None:
            if seq == gap[0]:
                self._broken(replica, seq, "entries are out of order (reordered)")
            else:
                self._broken(replica, gap[0], _missing(gap))
            return False
        if replica not in self.last and self.anchored and isinstance(seq, int):
            self.last[replica] = (seq - 1, str(e.get("prev")))
        last_seq, last_hash = self.last.get(replica, (0, GENESIS))
        self.first.setdefault(replica, last_seq + 1)
        if not isinstance(seq, int) or seq <= last_seq:
            self._broken(replica, seq, f"entry inserted or out of order after seq {last_seq}")
        elif seq != last_seq + 1:
            self.gaps[replica] = (last_seq + 1, seq - 1)
            return True  # decided by the next entry: the missing one (reordered) or not
        elif entry_hash(e) != e.get("hash"):
            self._broken(replica, seq, "entry content does not match its hash (edited)")
        elif e.get("prev") != last_hash:
            self._broken(
                replica,
                seq,
                f"entry does not follow the previous one (entry {seq - 1} was inserted or "
                "replaced)",
            )
        elif (sealed := e.get("content")) is not None and content_digest(
            sealed if isinstance(sealed, bytes) else base64.b64decode(sealed)
        ) != e.get("content_sha256"):
            self._broken(replica, seq, "sealed content does not match its digest (edited)")
        if self.failure is not None:
            return False
        self.last[replica] = (seq, e["hash"])  # type: ignore[assignment]
        for cp in self.due.pop((replica, seq), ()):  # type: ignore[arg-type]
            self._checkpoint(cp, e["hash"])
        return self.failure is None

    def _checkpoint(self, cp: dict[str, Any], head: str | None) -> None:
        body = {k: v for k, v in cp.items() if k != "signature"}
        pub = self.trusted.get(str(cp.get("key")))
        if pub is None:
            return self._broken(
                cp.get("replica"), cp.get("seq"), "checkpoint signed by an untrusted key"
            )
        try:
            pub.verify(bytes.fromhex(str(cp.get("signature", ""))), canonical(body))
        except (InvalidSignature, ValueError):
            return self._broken(cp.get("replica"), cp.get("seq"), "checkpoint signature is invalid")
        if head != cp.get("head"):
            return self._broken(
                cp.get("replica"),
                cp.get("seq"),
                "the signed chain head differs from the entries (entries rewritten or missing)",
            )
        replica = str(cp.get("replica"))
        self.signed[replica] = max(self.signed.get(replica, 0), int(cp["seq"]))

    def result(self) -> Verdict:
        for replica, gap in sorted(self.gaps.items()):
            self._broken(replica, gap[0], _missing(gap))
        if self.failure is None:
            for (replica, seq), cps in sorted(self.due.items(), key=lambda kv: str(kv[0])):
                # Checkpoints before a partial range's start cannot be checked: not a failure.
                if self.anchored and (replica not in self.first or seq < self.first[replica]):
                    continue
                if replica not in self.last or seq > self.last[replica][0]:
                    self._checkpoint(cps[0], None)
                    break
        if self.failure is not None:
            return self.failure
        unsigned = sum(seq - self.signed.get(r, 0) for r, (seq, _h) in self.last.items())
        return Verdict(
            True, self.count, len(self.checkpoints), unsigned=unsigned, replicas=len(self.last)
        )


def _missing(gap: tuple[int, int]) -> str:
    return f"entries {gap[0]}..{gap[1]} are missing (deleted)"


def verify(
    entries: Iterable[dict[str, Any]],
    checkpoints: Iterable[dict[str, Any]],
    trusted_keys: bytes | Iterable[bytes],
    anchored: bool = False,
) -> Verdict:
    """Verifies a whole trail given as entries in (replica, seq) order per replica."""
    keys = [trusted_keys] if isinstance(trusted_keys, bytes) else list(trusted_keys)
    v = Verifier(checkpoints, keys, anchored)
    for e in entries:
        if not v.feed(e):
            break
    return v.result()
