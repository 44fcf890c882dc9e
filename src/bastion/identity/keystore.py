"""Authenticating bearer tokens on the request path, from caches kept in step with the database.

The key cache is filled at start and then polled for rows past the last change number it saw
(`store.changes`): revocations made by another replica or the CLI reach every replica within
`identity.key_refresh_seconds` whatever the writers' clocks say; on this replica they are
immediate. Revoked session tokens (logout, offboarding) travel the same way.

Self-service keys (minted after a directory sign-in or with an SSO token) never outlive
`identity.self_service_key_max_days`, even ones stored before that limit existed. Keys minted
with an SSO token follow the user's group membership: when a later token of that user maps to
another team, or to none, their keys for the old team are revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select

from bastion.core.changes import Trail, recorded_change
from bastion.core.errors import AuthenticationFailed
from bastion.identity.keys import KEY_PREFIX, SELF_SERVICE, KeyRecord, hash_key, revoke_key
from bastion.identity.oidc import looks_like_jwt
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS
from bastion.identity.sessions import SESSION_PREFIX, SessionRevocations, Sessions
from bastion.identity.settings import GroupMapping
from bastion.identity.sso import SsoAuthenticator, mapped_principal
from bastion.identity.teams import Team, load_teams
from bastion.store.schema import api_keys, sessions

if TYPE_CHECKING:
    from bastion.identity.ldap_login import DirectoryLogin
    from bastion.identity.oidc_login import IdpLogin

log = logging.getLogger("bastion.identity")


class KeyStore:
    """Authenticates bearer tokens against the cached key table; never blocks the event loop."""

    #: Unknown hashes remembered briefly so a flood of bad keys does not become a flood of queries.
    NEGATIVE_TTL = 1.0
    NEGATIVE_MAX = 10_000

    def __init__(
        self,
        engine: Engine,
        refresh_seconds: float,
        sso: SsoAuthenticator | None = None,
        *,
        self_service_max: timedelta = timedelta(days=90),
        trail: Trail | None = None,
    ):
        self._engine = engine
        self._sso = sso
        if sso is not None:
            sso.membership = self._sso_membership
        #: Directory logins (`bastion login` session tokens), when LDAP is configured.
        self.login: DirectoryLogin | None = None
        #: Session tokens (`bss-`), from a directory sign-in or the console's IdP sign-in.
        self.sessions: Sessions | None = None
        #: The console's sign-in at the IdP (`identity.oidc[].console`), when configured.
        self.idp_login: IdpLogin | None = None
        self.trail = trail
        self.self_service_max = self_service_max
        self.revoked_sessions = SessionRevocations()
        self._refresh = refresh_seconds
        self._by_hash: dict[str, KeyRecord] = {}
        self._sso_keys: dict[str, set[str]] = {}  # user → hashes of their live SSO-minted keys
        self._teams: dict[str, Team] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._seen = {"api_keys": -1, "sessions": -1}
        self._revoking: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # -- cache maintenance ------------------------------------------------------------------
    def _changes(self) -> tuple[list[KeyRecord], list[tuple[str, datetime]], dict[str, Team], dict]:
        seen = dict(self._seen)
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).where(api_keys.c.change_seq > seen["api_keys"])
            ).all()
            ended = conn.execute(
                select(sessions.c.jti, sessions.c.expires_at, sessions.c.change_seq).where(
                    sessions.c.change_seq > seen["sessions"],
                    sessions.c.revoked_at.is_not(None),
                    sessions.c.expires_at > datetime.now(UTC),
                )
            ).all()
        seen["api_keys"] = max((r.change_seq for r in rows), default=seen["api_keys"])
        seen["sessions"] = max((r.change_seq for r in ended), default=seen["sessions"])
        records = [KeyRecord.from_row(r) for r in rows]
        return records, [(r.jti, r.expires_at) for r in ended], load_teams(self._engine), seen

    def _apply(
        self,
        records: list[KeyRecord],
        ended: list[tuple[str, datetime]],
        teams: dict[str, Team],
        seen: dict[str, int],
    ) -> None:
        self._teams = teams
        for rec in records:
            self._remember(rec)
            self._misses.pop(rec.key_hash, None)
        for jti, expires in ended:
            self.revoked_sessions.add(jti, expires)
        for stream, number in seen.items():
            self._seen[stream] = max(self._seen[stream], number)

    def _remember(self, rec: KeyRecord) -> None:
        self._by_hash[rec.key_hash] = rec
        if rec.source == "sso" and rec.user is not None:
            live = self._sso_keys.setdefault(rec.user, set())
            if rec.revoked_at is None:
                live.add(rec.key_hash)
            else:
                live.discard(rec.key_hash)

    @property
    def teams(self) -> dict[str, Team]:
        """The teams as last read (what sign-ins map users to)."""
        return self._teams

    def refresh_now(self) -> None:
        self._apply(*self._changes())

    async def start(self) -> None:
        self._seen = {"api_keys": -1, "sessions": -1}
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
                self.revoked_sessions.prune()
            except Exception:  # keep serving from the cache; say so every time
                log.exception("key refresh failed; serving from cached keys")

    def update(self, rec: KeyRecord) -> None:
        """Applies a change made on this replica at once (e.g. a revocation via the admin API)."""
        self._remember(rec)

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
        if self.sessions is not None and token.startswith(SESSION_PREFIX):
            return await self._session(token)
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
        now = datetime.now(UTC)
        state = rec.status(now)
        too_old = rec.source in SELF_SERVICE and rec.created_at + self.self_service_max <= now
        if state == "active" and too_old:  # minted before the limit existed, or with a longer one
            state = "expired"
        if state != "active":
            raise AuthenticationFailed(f"This API key is {state}.", code=f"key_{state}")
        team = self._teams.get(rec.team)
        if team is None:
            raise AuthenticationFailed("This API key's team no longer exists.", code="key_orphaned")
        models: frozenset[str] | None = frozenset(rec.models) if rec.models is not None else None
        if team.models is not None:
            models = team.models if models is None else models & team.models
        return Principal(rec.id, rec.team, team.cost_center, rec.user, models, rec.limits, rec.role)

    async def _session(self, token: str) -> Principal:
        claims = self.sessions.verify(token) if self.sessions is not None else {}
        if "idp" not in claims:  # a directory sign-in: the directory re-checks its groups
            if self.login is None:
                raise AuthenticationFailed("Invalid session token.", code="invalid_token")
            return await self.login.principal(token, self._teams, self.revoked_sessions)
        # An IdP sign-in (console): its groups were mapped at sign-in; the session is short
        # (`console.session_seconds`) and ends if that IdP or mapping is no longer configured.
        if claims.get("jti") in self.revoked_sessions:
            raise AuthenticationFailed(
                "This session was ended (signed out or revoked): sign in again.",
                code="session_revoked",
            )
        trusted = self.idp_login is not None and claims["idp"] in self.idp_login.issuers
        mappings = self._sso.mappings if self._sso is not None and trusted else []
        mapping = next(
            (m for m in mappings if (m.team, m.role) == (claims["team"], claims["role"])), None
        )
        if mapping is None:
            raise AuthenticationFailed(
                "Your identity provider, team or role is no longer configured: sign in again.",
                code="session_revoked",
            )
        identity = f"{claims['idp']}\0{claims['idp_sub']}"
        return mapped_principal(mapping, self._teams, str(claims["sub"]), "sso", identity)

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
        self._remember(rec)
        return rec

    # -- SSO-minted keys follow the user's groups --------------------------------------------
    def _sso_membership(self, user: str, mapping: GroupMapping | None) -> None:
        """Called with what each SSO token of `user` maps to: keys minted for another team, or
        by a user who may no longer call models, are revoked (in the background)."""
        live = self._sso_keys.get(user)
        if not live:
            return
        keep = mapping.team if mapping is not None and mapping.role in CALLERS else None
        stale = [
            self._by_hash[h]
            for h in live
            if self._by_hash[h].team != keep and self._by_hash[h].id not in self._revoking
        ]
        for rec in stale:
            self._revoking.add(rec.id)
            # The key stops working here at once; the revocation is stored and recorded next.
            self._remember(_revoked_now(rec))
            asyncio.get_running_loop().create_task(self._revoke_stale(rec, keep))

    async def _revoke_stale(self, rec: KeyRecord, keep: str | None) -> None:
        reason = f"{rec.user}'s SSO groups now map to " + (f"team {keep}" if keep else "no team")
        try:
            async with recorded_change(
                self.trail, "sso-membership", "key.revoke", takes_access_away=True,
                team=rec.team, before=rec.public(), reason=reason,
            ):  # fmt: skip
                self._remember(await asyncio.to_thread(revoke_key, self._engine, rec.id))
            log.warning("revoked SSO-minted key %s: %s", rec.id, reason)
        except Exception:
            # Fail closed: the key stays refused here, and the next token of this user retries.
            log.exception(
                "could not store the revocation of SSO-minted key %s (%s)", rec.id, reason
            )
            self._sso_keys.setdefault(str(rec.user), set()).add(rec.key_hash)
        finally:
            self._revoking.discard(rec.id)


def _revoked_now(rec: KeyRecord) -> KeyRecord:
    return replace(rec, revoked_at=datetime.now(UTC))
