"""The audit trail's secrets behind one seam: the master key, and the checkpoint-signing key.

- The **master key** wraps every team's data key (crypto.py). It comes from
  $BASTION_AUDIT_MASTER_KEY or `audit.master_key_file`. A KMS or HSM plugs in as another
  `KeyWrapper`.
- The **signing key** (Ed25519) is never stored in clear: from $BASTION_AUDIT_SIGNING_KEY
  (base64 of the 32-byte private key, from a secret store), or else `audit.signing_key`, which
  holds it wrapped by the master key (through the same `KeyWrapper`, so a KMS wraps it too). A
  clear PEM key left by an older version is wrapped in place on first load.
- **Rotation** (`rotate_master_key`) re-wraps every live data key and the signing key under a
  fresh master key and then replaces the key file, so the old key is gone. Shredding a team
  during a rotation is what makes shredding survive database backups: its data keys are not
  re-wrapped, and the only key that unwraps them in a backup no longer exists. The new key is
  written to `<file>.next` first and both keys unwrap until the rotation completes, so a crash
  at any step loses nothing; running it again finishes the job.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from sqlalchemy import Engine, select, update

from bastion.audit.crypto import KeyWrapper, MasterKey
from bastion.audit.settings import AuditSettings
from bastion.audit.store import on_hold, shred
from bastion.core.errors import DeploymentError
from bastion.store.schema import audit_keys

log = logging.getLogger("bastion.audit")
MASTER_KEY_ENV = "BASTION_AUDIT_MASTER_KEY"
SIGNING_KEY_ENV = "BASTION_AUDIT_SIGNING_KEY"
#: Bound into the signing key's wrapping; no team can be named this (NUL is not allowed).
SIGNING_LABEL = "\x00audit-signing-key"
SIGNING_FORMAT = "bastion-audit-signing-key"


#: Where to get the keys when they are not created here (said by every "missing key" error).
SHARED_KEYS_HINT = (
    "keys are created on first start only with the embedded SQLite database; replicas and "
    "CLI hosts sharing a database must all be given the same keys (`bastion secrets "
    "init --dir DIR` makes a set; see docs/deploy.md)"
)


class KeyMissing(DeploymentError):
    """A key the deployment must supply is absent (a shared database: none is invented)."""


class KeyOperationError(Exception):
    """A key operation cannot be done safely (nothing was changed)."""


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".next")


def load_master_key(settings: AuditSettings, create: bool = True) -> MasterKey:
    """From $BASTION_AUDIT_MASTER_KEY, else the key file (created on first start). During a
    rotation cut short, the incoming key wraps and both unwrap."""
    if text := os.environ.get(MASTER_KEY_ENV):
        return MasterKey.from_base64(text)
    path = Path(settings.master_key_file)
    if not path.exists() and not _pending(path).exists() and not create:
        raise KeyMissing(
            f"no audit master key: set {MASTER_KEY_ENV} or put it at audit.master_key_file "
            f"({path}); {SHARED_KEYS_HINT}"
        )
    if not path.exists() and create:
        _write_new(path, base64.b64encode(os.urandom(32)) + b"\n")
        log.warning(
            "created the audit master key %s: back it up now (without it no recorded content "
            "can ever be read), or supply it from your secret store via %s",
            path,
            MASTER_KEY_ENV,
        )
    if _pending(path).exists():
        return MasterKey.from_base64(_pending(path).read_text(), path.read_text())
    return MasterKey.from_base64(path.read_text())


def load_signing_key(
    settings: AuditSettings, wrapper: KeyWrapper, create: bool = True
) -> tuple[Ed25519PrivateKey, bool]:
    """The checkpoint-signing key; returns (key, created)."""
    if text := os.environ.get(SIGNING_KEY_ENV):
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text.strip())), False
    path = Path(settings.signing_key)
    if path.exists():
        data = path.read_bytes()
        if data.startswith(b"-----BEGIN"):  # an older version's clear PEM: wrap it now
            key = load_pem_private_key(data, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
            _replace(path, _wrapped_signing_key(key, wrapper))
            log.warning("the audit signing key %s is now stored wrapped by the master key", path)
            return key, False
        doc = orjson.loads(data)
        if doc.get("format") != SIGNING_FORMAT or doc.get("version") != 1:
            raise ValueError(f"{path}: not a Bastion audit signing key")
        raw = wrapper.unwrap(base64.b64decode(doc["wrapped"]), SIGNING_LABEL)
        return Ed25519PrivateKey.from_private_bytes(raw), False
    if not create:
        raise KeyMissing(
            f"no audit signing key: set {SIGNING_KEY_ENV} or put it at audit.signing_key "
            f"({path}); {SHARED_KEYS_HINT}"
        )
    key = Ed25519PrivateKey.generate()
    _write_new(path, _wrapped_signing_key(key, wrapper))
    return key, True


#: The files `bastion secrets init` writes, and the settings that point at them.
SECRET_FILES = {
    "audit-master.key": "audit.master_key_file",
    "audit-signing.key": "audit.signing_key",
    "session.key": "identity.session_key_file",
}


def init_secrets(directory: Path) -> str:
    """A fresh set of the keys every replica and CLI host shares, written (mode 0600) to
    `directory` for a secret store or a mounted Secret; the signing key is wrapped by the
    master key. Refuses to overwrite any. Returns the signing key's public key (hex)."""
    from bastion.audit.chain import public_key_hex

    taken = [name for name in SECRET_FILES if (directory / name).exists()]
    if taken:
        raise KeyOperationError(f"{directory}: {', '.join(taken)} exist already; not replaced")
    master_b64 = base64.b64encode(os.urandom(32))
    key = Ed25519PrivateKey.generate()
    _write_new(directory / "audit-master.key", master_b64 + b"\n")
    _write_new(
        directory / "audit-signing.key",
        _wrapped_signing_key(key, MasterKey.from_base64(master_b64.decode())),
    )
    _write_new(directory / "session.key", base64.b64encode(os.urandom(32)) + b"\n")
    return public_key_hex(key)


def check_master_key(db: Engine, wrapper: KeyWrapper) -> None:
    """At start: the master key must unwrap the team keys already in the database, else this
    replica would answer 503 to every recorded request (and wrap new keys nobody else reads)."""
    with db.connect() as conn:
        row = conn.execute(
            select(audit_keys.c.team, audit_keys.c.wrapped)
            .where(audit_keys.c.wrapped.is_not(None))
            .order_by(audit_keys.c.created_at.desc())
            .limit(1)
        ).first()
    if row is None:
        return
    try:
        wrapper.unwrap(row.wrapped, row.team)
    except Exception as exc:  # ContentUnavailable, or a KMS's own error
        raise DeploymentError(
            f"this audit master key does not unwrap the team keys in the database ({exc}): "
            f"every replica must be given the same master key; {SHARED_KEYS_HINT}"
        ) from exc


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _wrapped_signing_key(key: Ed25519PrivateKey, wrapper: KeyWrapper) -> bytes:
    wrapped = base64.b64encode(wrapper.wrap(_raw(key), SIGNING_LABEL)).decode()
    return orjson.dumps({"format": SIGNING_FORMAT, "version": 1, "wrapped": wrapped}) + b"\n"


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _sync_dir(path.parent)


def _replace(path: Path, data: bytes) -> None:
    """Atomically: the old contents or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate_master_key(
    settings: AuditSettings,
    db: Engine,
    team_to_shred: str | None = None,
    settle_seconds: float = 0.0,
    on_hold: Any = None,
) -> dict[str, Any]:
    """A fresh master key; every live data key and the signing key re-wrapped under it; the
    old key file replaced. `team_to_shred`: that team's data keys are destroyed instead of
    re-wrapped. `settle_seconds`: how long running gateways take to pick up the new key file
    (`identity.key_refresh_seconds`); keys they wrapped meanwhile are re-wrapped afterwards."""
    if os.environ.get(MASTER_KEY_ENV):
        raise KeyOperationError(
            f"the master key comes from ${MASTER_KEY_ENV}: rotate it in your secret store "
            "(re-wrap with `bastion audit rotate-master-key` run against a key file)"
        )
    path = Path(settings.master_key_file)
    if not path.exists():
        raise KeyOperationError(f"no audit master key at {path}")
    if not _pending(path).exists():  # else a rotation was cut short: finish that one
        _write_new(_pending(path), base64.b64encode(os.urandom(32)) + b"\n")
    both = load_master_key(settings, create=False)  # wraps with the new, unwraps with both
    if team_to_shred is not None and on_hold is not None and on_hold(team_to_shred):
        raise KeyOperationError(
            f"team {team_to_shred!r} is under legal hold: its audit trail is kept"
        )
    destroyed = _rewrap(db, both, team_to_shred)
    signing = Path(settings.signing_key)
    if signing.exists() and not os.environ.get(SIGNING_KEY_ENV):
        key, _ = load_signing_key(settings, both, create=False)
        _replace(signing, _wrapped_signing_key(key, both))
    os.replace(_pending(path), path)  # the old master key is gone from this host
    _sync_dir(path.parent)
    if settle_seconds:  # gateways still on the old key may have wrapped a new team's key
        time.sleep(settle_seconds)
        _rewrap(db, both, None)
    return {"rotated": True, "shredded_team": team_to_shred, "destroyed_keys": destroyed}


def shred_team(audit: AuditSettings, db: Engine, team: str, settings: Any) -> dict[str, Any]:
    """Shred by rotation where the master key is a file Bastion manages; where it comes from
    the environment (a secret store), the wrapped keys are destroyed and the operator rotates
    the master key in that store (docs/audit.md)."""
    if os.environ.get(MASTER_KEY_ENV):
        return {"destroyed_keys": shred(db, team), "master_key_rotated": False}
    out = rotate_master_key(
        audit,
        db,
        team_to_shred=team,
        settle_seconds=settings.identity.key_refresh_seconds + 1,
        on_hold=lambda t: on_hold(db, t),
    )
    return {"destroyed_keys": out["destroyed_keys"], "master_key_rotated": True}


def _rewrap(db: Engine, wrapper: MasterKey, team_to_shred: str | None) -> int:
    destroyed = 0
    with db.begin() as conn:
        rows = conn.execute(
            select(audit_keys.c.id, audit_keys.c.team, audit_keys.c.wrapped).where(
                audit_keys.c.destroyed_at.is_(None)
            )
        ).all()
        for r in rows:
            if r.team == team_to_shred:
                values: dict[str, Any] = {"wrapped": None, "destroyed_at": datetime.now(UTC)}
                destroyed += 1
            else:
                values = {"wrapped": wrapper.wrap(wrapper.unwrap(r.wrapped, r.team), r.team)}
            conn.execute(update(audit_keys).where(audit_keys.c.id == r.id).values(**values))
    return destroyed
