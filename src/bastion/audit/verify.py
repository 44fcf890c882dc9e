"""`bastion audit verify`: recompute every chain and check every signed checkpoint.

Trust comes from outside the data: the local signing key's public key, the ones listed in
`audit.trusted_public_keys`, and any given on the command line. A checkpoint signed by any
other key fails, so rewriting the trail and re-signing it with a new key is caught.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from sqlalchemy import Engine

from bastion.audit import store
from bastion.audit.chain import Verdict, Verifier, public_key_hex
from bastion.audit.reader import read_export
from bastion.audit.settings import AuditSettings


def trusted_keys(settings: AuditSettings, *extra: str | None) -> list[str]:
    keys = [k for k in (*extra, *settings.trusted_public_keys) if k]
    path = Path(settings.signing_key)
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey):
            keys.append(public_key_hex(key))
    return sorted(set(keys))


def _keys(trust: list[str]) -> list[bytes]:
    try:
        return [bytes.fromhex(k) for k in trust]
    except ValueError:
        raise ValueError("a trusted public key is not hex (64 hex digits expected)") from None


def verify_store(db: Engine, trust: list[str], since: datetime | None = None) -> Verdict:
    v = Verifier(store.checkpoints(db), _keys(trust), anchored=since is not None)
    for entry in store.iter_entries(db, since):
        if not v.feed(entry):
            break
    return v.result()


def verify_file(path: Path, trust: list[str]) -> Verdict:
    with open(path, "rb") as f:
        entries, cps = read_export(iter(f))
    v = Verifier(cps, _keys(trust), anchored=True)
    for entry in entries:
        if not v.feed(entry):
            break
    return v.result()
