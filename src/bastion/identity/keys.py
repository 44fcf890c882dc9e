"""API keys: shown once, stored as SHA-256 hashes; their records and every write to them.

A key is 256 random bits, so a fast hash is the right one (as for GitHub or Stripe tokens):
nothing to brute-force, and no slow hash on the request path. Every write takes the next number
of the `api_keys` change sequence (`store.changes`), which is how the replicas' caches
(`keystore.py`) learn of it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, select

from bastion.core.settings import LimitSettings
from bastion.identity.roles import ROLES
from bastion.identity.teams import IdentityError, UnknownName, load_teams
from bastion.store.changes import next_change
from bastion.store.schema import adapter_deployments, api_keys

KEY_PREFIX = "bst-"
#: Keys a user mints for themselves: after a directory sign-in, or with an SSO token.
SELF_SERVICE = ("self-service", "sso")


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _utc(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything Bastion stores is UTC.
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    key_hash: str
    prefix: str
    name: str
    team: str
    user: str | None
    models: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: LimitSettings | None = None
    role: str = "member"
    source: str = "admin"
    created_by: str | None = None
    #: The approval this key waits for (four eyes); it does not work until then.
    approval: str | None = None

    @classmethod
    def from_row(cls, r) -> KeyRecord:  # type: ignore[no-untyped-def]
        return cls(
            r.id,
            r.key_hash,
            r.prefix,
            r.name,
            r.team,
            r.user,
            tuple(r.models) if r.models is not None else None,
            _utc(r.created_at),
            _utc(r.expires_at),
            _utc(r.revoked_at),
            LimitSettings.model_validate(r.limits) if r.limits else None,
            r.role or "member",
            r.source or "admin",
            r.created_by,
            r.approval,
        )  # type: ignore[arg-type]

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.approval is not None:
            return "pending"
        return "active"

    def public(self, now: datetime | None = None) -> dict[str, object]:
        """What may be shown about a key: never its hash."""
        now = now or datetime.now(UTC)
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "team": self.team,
            "user": self.user,
            "models": list(self.models) if self.models is not None else None,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "status": self.status(now),
            # Budgets as exact decimal strings ("0.05"), never floats.
            "limits": self.limits.model_dump(mode="json", exclude_none=True)
            if self.limits
            else None,
            "role": self.role,
            "source": self.source,
            "created_by": self.created_by,
            "approval": self.approval,
        }


@dataclass(frozen=True)
class NewKey:
    """A key checked and made, not yet stored: its record can be written to the audit trail
    before the key exists (`bastion.core.changes`)."""

    record: KeyRecord
    token: str
    row: dict[str, Any]

    def save(self, engine: Engine) -> KeyRecord:
        with engine.begin() as conn:
            conn.execute(api_keys.insert(), {**self.row, "change_seq": _seq(conn)})
        return self.record


def _seq(conn: Connection) -> int:
    return next_change(conn, "api_keys")


def new_key(
    engine: Engine,
    *,
    team: str,
    known_models: set[str],
    user: str | None = None,
    models: list[str] | None = None,
    expires_in: timedelta | None = None,
    name: str = "",
    limits: LimitSettings | None = None,
    role: str = "member",
    source: str = "admin",
    created_by: str | None = None,
    approval: str | None = None,
) -> NewKey:
    """Checks and makes a key (IdentityError naming what is wrong); `save` stores it. The
    plaintext token is never stored and can be shown only once."""
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
    teams = load_teams(engine)
    if team not in teams:
        raise UnknownName(f"unknown team {team!r}")
    unknown = [m for m in models or [] if m not in known_models]
    if unknown:  # an adapter alias (`bastion models deploy`) is a model too
        with engine.connect() as conn:
            deployed = set(conn.execute(select(adapter_deployments.c.alias)).scalars())
        unknown = [m for m in unknown if m not in deployed]
    if unknown:
        raise UnknownName(f"unknown model(s): {', '.join(unknown)}")
    if expires_in is not None and expires_in <= timedelta(0):
        raise IdentityError("expiry must be in the future")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    row = {
        "id": "key_" + secrets.token_hex(8),
        "key_hash": hash_key(token),
        "prefix": token[:12],
        "name": name,
        "team": team,
        "user": user,
        "models": models,
        "created_at": now,
        "expires_at": now + expires_in if expires_in else None,
        "revoked_at": None,
        "updated_at": now,
        "limits": _limits_json(limits),
        "role": role,
        "source": source,
        "created_by": created_by,
        "approval": approval,
    }
    return NewKey(KeyRecord.from_row(SimpleNamespace(**row)), token, row)


def create_key(engine: Engine, **kw: Any) -> tuple[KeyRecord, str]:
    """Makes and stores a key at once (no audit record: for tests and the quickstart)."""
    made = new_key(engine, **kw)
    return made.save(engine), made.token


def _limits_json(limits: LimitSettings | None) -> dict[str, object] | None:
    if limits is None or limits.is_empty():
        return None
    return limits.model_dump(mode="json", exclude_none=True)


def _change_key(engine: Engine, key_id: str, only_if: Any = None, **values: Any) -> KeyRecord:
    """Writes `values` to the key (when `only_if` holds for it) with the next change number."""
    with engine.begin() as conn:
        where = api_keys.c.id == key_id
        if conn.execute(select(api_keys.c.id).where(where)).first() is None:
            raise IdentityError(f"no key with id {key_id!r}")
        if only_if is not None:
            where &= only_if
        conn.execute(
            api_keys.update().where(where),
            {**values, "updated_at": datetime.now(UTC), "change_seq": _seq(conn)},
        )
    rec = get_key(engine, key_id)
    assert rec is not None
    return rec


def set_key_limits(engine: Engine, key_id: str, limits: LimitSettings | None) -> KeyRecord:
    """Replaces a key's own limits (None: only `limits.defaults.key`)."""
    return _change_key(engine, key_id, limits=_limits_json(limits))


def activate_key(engine: Engine, key_id: str) -> KeyRecord:
    """A key whose approval was granted starts to work."""
    return _change_key(engine, key_id, api_keys.c.revoked_at.is_(None), approval=None)


def list_keys(engine: Engine, team: str | None = None) -> list[KeyRecord]:
    q = select(api_keys).order_by(api_keys.c.created_at)
    if team is not None:
        q = q.where(api_keys.c.team == team)
    with engine.connect() as conn:
        return [KeyRecord.from_row(r) for r in conn.execute(q)]


def get_key(engine: Engine, key_id: str) -> KeyRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    return KeyRecord.from_row(row) if row else None


def revoke_key(engine: Engine, key_id: str) -> KeyRecord:
    return _change_key(
        engine, key_id, api_keys.c.revoked_at.is_(None), revoked_at=datetime.now(UTC)
    )


def self_service_owners(engine: Engine, source: str = "self-service") -> dict[str, set[str]]:
    """Users holding live keys of `source`, with the teams of those keys."""
    q = select(api_keys.c.user, api_keys.c.team).where(
        api_keys.c.source == source, api_keys.c.revoked_at.is_(None)
    )
    out: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for user, team in conn.execute(q):
            out.setdefault(user, set()).add(team)
    return out


def self_service_keys(
    engine: Engine, user: str, keep_team: str | None, source: str = "self-service"
) -> list[KeyRecord]:
    """The user's live keys of `source`, except those of `keep_team`."""
    q = api_keys.c.user == user
    q &= (api_keys.c.source == source) & api_keys.c.revoked_at.is_(None)
    if keep_team is not None:
        q &= api_keys.c.team != keep_team
    with engine.connect() as conn:
        return [KeyRecord.from_row(r) for r in conn.execute(select(api_keys).where(q))]
