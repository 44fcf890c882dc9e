"""The external anchor: signed manifests of every chain's head, outside the database.

Checkpoints live in the same database as the entries, so someone who can write it can delete a
chain's tail together with its last checkpoints, or a whole chain, and what is left still
verifies. A manifest closes that: every `audit.anchor_seconds` a gateway signs the set of
replicas and the newest head each has under a trusted signature, and appends it as one JSON
line to `<audit.anchor_dir>/<replica>.jsonl`. That directory belongs on storage the database
administrators cannot rewrite (a separate mount, a WORM bucket's mount, a log shipper's spool).
`verify` then requires every anchored head to be present with that hash (a missing chain or a
truncated tail fails) and every chain older than the newest manifest to be named in it (an
added chain fails).

Only heads signed by a trusted key go into a manifest: a chain planted in the database is never
vouched for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.audit.chain import canonical, public_key_hex

log = logging.getLogger("bastion.audit")
FORMAT = "bastion-audit-manifest"
VERSION = 1


class AnchorError(Exception):
    """The anchor cannot be read or holds something it should not: verification fails."""


def trusted_heads(checkpoints: list[dict[str, Any]], trusted: set[str]) -> dict[str, Any]:
    """Per replica, the newest checkpoint whose signature a trusted key made."""
    heads: dict[str, Any] = {}
    for cp in checkpoints:
        if cp.get("key") not in trusted or not _signed(cp, str(cp["key"])):
            continue
        r = str(cp["replica"])
        if r not in heads or int(cp["seq"]) > heads[r]["seq"]:
            heads[r] = {"seq": int(cp["seq"]), "head": cp["head"]}
    return heads


def manifest(key: Ed25519PrivateKey, signer: str, heads: dict[str, Any]) -> dict[str, Any]:
    body = {
        "format": FORMAT,
        "version": VERSION,
        "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
        "signer": signer,
        "replicas": heads,
        "key": public_key_hex(key),
    }
    return {**body, "signature": key.sign(canonical(body)).hex()}


def append(directory: Path, signer: str, m: dict[str, Any]) -> None:
    """One line, appended and flushed to disk: a manifest is either whole or cut off."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f"{signer}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, orjson.dumps({"manifest": m}, option=orjson.OPT_SORT_KEYS) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _signed(obj: dict[str, Any], key_hex: str) -> bool:
    body = {k: v for k, v in obj.items() if k != "signature"}
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        pub.verify(bytes.fromhex(str(obj.get("signature", ""))), canonical(body))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class Anchored:
    """What the anchor vouches for: the newest head of each replica, and the newest replica
    set (its time, its names)."""

    witnesses: list[dict[str, Any]] = field(default_factory=list)
    replica_set: tuple[float, set[str]] | None = None
    manifests: int = 0


def read(directory: Path, trusted: set[str]) -> Anchored:
    """Every manifest in the anchor, each checked against the trusted keys."""
    if not directory.is_dir():
        raise AnchorError(f"the audit anchor {directory} is not there (lost or not mounted)")
    heads: dict[str, dict[str, Any]] = {}
    out = Anchored()
    for path in sorted(directory.glob("*.jsonl")):
        lines = path.read_bytes().split(b"\n")
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                m = orjson.loads(raw)["manifest"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                if n == len(lines):  # a write cut off by a crash: never acknowledged
                    continue
                raise AnchorError(f"{path}:{n}: not a manifest") from None
            _check(m, trusted, f"{path}:{n}")
            out.manifests += 1
            at = datetime.fromisoformat(m["ts"]).timestamp()
            if out.replica_set is None or at > out.replica_set[0]:
                out.replica_set = (at, set(m["replicas"]))
            for r, h in m["replicas"].items():
                seen = heads.get(r)
                if seen is not None and seen["seq"] == h["seq"] and seen["head"] != h["head"]:
                    raise AnchorError(f"{path}:{n}: two signed heads for {r}#{h['seq']}")
                if seen is None or h["seq"] > seen["seq"]:
                    heads[r] = {"replica": r, "seq": int(h["seq"]), "head": h["head"]}
    out.witnesses = list(heads.values())
    return out


def _check(m: dict[str, Any], trusted: set[str], where: str) -> None:
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise AnchorError(f"{where}: unknown manifest format {m.get('format')}/{m.get('version')}")
    if m.get("key") not in trusted:
        raise AnchorError(f"{where}: manifest signed by an untrusted key")
    if not _signed(m, str(m["key"])):
        raise AnchorError(f"{where}: manifest signature is invalid")
