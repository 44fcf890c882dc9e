"""API keys: shown once, stored as SHA-256 hashes, checked from an in-memory cache.

A key is 256 random bits, so a fast hash is the right one (as for GitHub or Stripe tokens):
nothing to brute-force, and no slow hash on the request path. The cache is filled at start and
kept current by polling `updated_at`, so revocations made by another replica or by the CLI
reach every replica within `identity.key_refresh_seconds`; on this replica they are immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select

from bastion.core.errors import AuthenticationFailed
from bastion.core.settings import LimitSettings
from bastion.identity.oidc import looks_like_jwt
from bastion.identity.principal import Principal
from bastion.identity.roles import ROLES
from bastion.identity.sessions import SESSION_PREFIX
from bastion.identity.sso import SsoAuthenticator
from bastion.identity.teams import IdentityError, Team, load_teams

if TYPE_CHECKING:
    from bastion.identity.ldap_login import DirectoryLogin
from bastion.store.schema import api_keys

log = logging.getLogger("bastion.identity")
KEY_PREFIX = "bst-"


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
        )  # type: ignore[arg-type]

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
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
            conn.execute(api_keys.insert(), self.row)
        return self.record


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
) -> NewKey:
    """Checks and makes a key (IdentityError naming what is wrong); `save` stores it. The
    plaintext token is never stored and can be shown only once."""
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
    teams = load_teams(engine)
    if team not in teams:
        raise IdentityError(f"unknown team {team!r}")
    unknown = [m for m in models or [] if m not in known_models]
    if unknown:
        raise IdentityError(f"unknown model(s): {', '.join(unknown)}")
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


def set_key_limits(engine: Engine, key_id: str, limits: LimitSettings | None) -> KeyRecord:
    """Replaces a key's own limits (None: back to `limits.defaults.key`)."""
    with engine.begin() as conn:
        done = conn.execute(
            api_keys.update().where(api_keys.c.id == key_id),
            {"limits": _limits_json(limits), "updated_at": datetime.now(UTC)},
        )
        if done.rowcount == 0:
            raise IdentityError(f"no key with id {key_id!r}")
    rec = get_key(engine, key_id)
    assert rec is not None
    return rec


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
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise IdentityError(f"no key with id {key_id!r}")
        if row.revoked_at is None:
            conn.execute(
                api_keys.update().where(api_keys.c.id == key_id),
                {"revoked_at": now, "updated_at": now},
            )
    rec = get_key(engine, key_id)
    assert rec is not None
    return rec


def self_service_owners(engine: Engine) -> dict[str, set[str]]:
    """Users holding live self-service keys, with the teams of those keys."""
    q = select(api_keys.c.user, api_keys.c.team).where(
        api_keys.c.source == "self-service", api_keys.c.revoked_at.is_(None)
    )
    out: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for user, team in conn.execute(q):
            out.setdefault(user, set()).add(team)
    return out


def self_service_keys(engine: Engine, user: str, keep_team: str | None) -> list[KeyRecord]:
    """The user's live self-service keys, except those of `keep_team`."""
    q = api_keys.c.user == user
    q &= (api_keys.c.source == "self-service") & api_keys.c.revoked_at.is_(None)
    if keep_team is not None:
        q &= api_keys.c.team != keep_team
    with engine.connect() as conn:
        return [KeyRecord.from_row(r) for r in conn.execute(select(api_keys).where(q))]


class KeyStore:
    """Authenticates bearer tokens against the cached key table; never blocks the event loop."""

    #: Unknown hashes remembered briefly so a flood of bad keys does not become a flood of queries.
    NEGATIVE_TTL = 1.0
    NEGATIVE_MAX = 10_000

    def __init__(self, engine: Engine, refresh_seconds: float, sso: SsoAuthenticator | None = None):
        self._engine = engine
        self._sso = sso
        #: Directory logins (`bastion login` session tokens), when LDAP is configured.
        self.login: DirectoryLogin | None = None
        self._refresh = refresh_seconds
        self._by_hash: dict[str, KeyRecord] = {}
        self._teams: dict[str, Team] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._watermark: datetime | None = None
        self._task: asyncio.Task[None] | None = None

    # -- cache maintenance ------------------------------------------------------------------
    def _changes(self) -> tuple[list[KeyRecord], dict[str, Team], datetime | None]:
        q = select(api_keys)
        if self._watermark is not None:
            # A little overlap: rows written in the same instant as the last poll are re-read.
            q = q.where(api_keys.c.updated_at >= self._watermark - timedelta(seconds=1))
        with self._engine.connect() as conn:
            rows = conn.execute(q).all()
        newest = max((_utc(r.updated_at) for r in rows), default=None)
        return [KeyRecord.from_row(r) for r in rows], load_teams(self._engine), newest

    def _apply(
        self, records: list[KeyRecord], teams: dict[str, Team], newest: datetime | None
    ) -> None:
        self._teams = teams
        for rec in records:
            self._by_hash[rec.key_hash] = rec
            self._misses.pop(rec.key_hash, None)
        if newest is not None and (self._watermark is None or newest > self._watermark):
            self._watermark = newest

    def refresh_now(self) -> None:
        self._apply(*self._changes())

    async def start(self) -> None:
        self._watermark = None
        await asyncio.to_thread(self.refresh_now)
        self._task = asyncio.create_task(self._poll(), name="bastion-key-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            try:
                self._apply(*await asyncio.to_thread(self._changes))
            except Exception:  # keep serving from the cache; say so every time
                log.exception("key refresh failed; serving from cached keys")

    def update(self, rec: KeyRecord) -> None:
        """Applies a change made on this replica at once (e.g. a revocation via the admin API)."""
        self._by_hash[rec.key_hash] = rec

    # -- the request path -------------------------------------------------------------------
    def _lookup_db(self, key_hash: str) -> KeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return KeyRecord.from_row(row) if row else None

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        if self.login is not None and token.startswith(SESSION_PREFIX):
            return await self.login.principal(token, self._teams)
        if self._sso is not None and not token.startswith(KEY_PREFIX) and looks_like_jwt(token):
            return await self._sso.authenticate(token, self._teams)
        if not token.startswith(KEY_PREFIX) or len(token) > 256:
            raise AuthenticationFailed("Incorrect API key provided.")
        key_hash = hash_key(token)
        rec = self._by_hash.get(key_hash)
        if rec is None:
            rec = await self._miss(key_hash)
        # The dict lookup already matched; compare again in constant time as a belt-and-braces.
        if rec is None or not hmac.compare_digest(rec.key_hash, key_hash):
            raise AuthenticationFailed("Incorrect API key provided.")
        state = rec.status(datetime.now(UTC))
        if state != "active":
            raise AuthenticationFailed(f"This API key is {state}.", code=f"key_{state}")
        team = self._teams.get(rec.team)
        if team is None:
            raise AuthenticationFailed("This API key's team no longer exists.", code="key_orphaned")
        models: frozenset[str] | None = frozenset(rec.models) if rec.models is not None else None
        if team.models is not None:
            models = team.models if models is None else models & team.models
        return Principal(rec.id, rec.team, team.cost_center, rec.user, models, rec.limits, rec.role)

    async def _miss(self, key_hash: str) -> KeyRecord | None:
        now = time.monotonic()
        seen = self._misses.get(key_hash)
        if seen is not None and now - seen < self.NEGATIVE_TTL:
            return None
        rec = await asyncio.to_thread(self._lookup_db, key_hash)
        if rec is None:
            self._misses[key_hash] = now
            self._misses.move_to_end(key_hash)
            while len(self._misses) > self.NEGATIVE_MAX:
                self._misses.popitem(last=False)
            return None
        if rec.team not in self._teams:  # a team made moments ago on another replica
            self._teams = await asyncio.to_thread(load_teams, self._engine)
        self._by_hash[key_hash] = rec
        return rec
