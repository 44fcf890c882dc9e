"""Directory logins: LDAP / Active Directory credentials → a session token, and keeping it honest.

`login` checks the password against the directory (search-then-bind, ldap.py), maps the user's
groups to a team and role (`identity.group_mappings`, first match wins) and issues a session
token (sessions.py). Every use of a session re-reads the user's groups once they are older than
`identity.group_cache_seconds`; a user no longer mapped to the same team and role (a disabled
account maps to nothing) loses the session at once. A sweep on the same period revokes
self-service keys and sessions of users the directory no longer maps to the key's team, so
leaving a group or being disabled ends every access within that period.

Sign-in attempts are throttled per user name (normalised as the directory compares names) and
per client address. An attempt is reserved as a failure before the directory is asked and only
released when the password proves right, so concurrent guesses cannot outrun the counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import unicodedata
from collections import deque
from typing import Any, Protocol

from sqlalchemy import Engine

from bastion.core.changes import Trail, recorded_change
from bastion.core.errors import AuthenticationFailed, DirectoryDown, RateLimited
from bastion.identity.keys import revoke_key, self_service_keys, self_service_owners
from bastion.identity.ldap import DirectoryUnavailable, LdapDirectory, LoginFailed
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS
from bastion.identity.sessions import SessionRevocations, Sessions, revoke_sessions
from bastion.identity.settings import GroupMapping, IdentitySettings
from bastion.identity.sso import first_mapping, mapped_principal, not_mapped
from bastion.identity.teams import Team

log = logging.getLogger("bastion.identity")


def normalised(username: str) -> str:
    """A user name as LDAP's caseIgnoreMatch compares it: compatibility-normalised, case-folded,
    surrounding space dropped and inner runs of space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", username).casefold().split())


class LoginThrottle:
    """Failed sign-ins per user name and per source address, in a sliding window, in this
    replica's memory (across replicas too with `limits.backend: redis`: `SharedThrottle`)."""

    def __init__(self, max_failures: int, window: float):
        self.limits = {"user": max_failures, "source": 4 * max_failures}
        self.window = window
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        seen = self.failures.get(key, deque())
        while seen and now - seen[0] > self.window:
            seen.popleft()
        return seen

    def reserve(self, keys: tuple[str, ...]) -> float:
        """Counts an attempt as failed before it is made (429 if any key is at its limit); no
        await separates the check from the count, so concurrent attempts all see each other."""
        now = time.monotonic()
        for key in keys:
            seen = self._recent(key, now)
            if len(seen) >= self.limits[key.split(":", 1)[0]]:
                wait = max(1, int(self.window - (now - seen[0])) + 1)
                raise RateLimited(
                    f"Too many failed sign-ins; try again in {wait} s.",
                    code="login_throttled",
                    headers={"retry-after": str(wait)},
                )
        for key in keys:
            seen = self._recent(key, now)
            seen.append(now)
            self.failures[key] = seen
        if len(self.failures) > 100_000:  # a spray of names: forget the oldest
            for key in list(self.failures)[:50_000]:
                del self.failures[key]
        return now

    def release(self, keys: tuple[str, ...], reserved: float) -> None:
        """The attempt did not fail (right password, or the directory was down): uncount it; a
        right password also clears the user name's failures."""
        for key in keys:
            seen = self.failures.get(key)
            if seen is not None and reserved in seen:
                seen.remove(reserved)

    def succeeded(self, key: str) -> None:
        self.failures.pop(key, None)


class SharedThrottle(Protocol):
    """The same reservations counted across replicas (limits/login_throttle.py)."""

    async def reserve(self, keys: tuple[str, ...]) -> str | None: ...

    async def release(self, keys: tuple[str, ...], rid: str | None) -> None: ...


class DirectoryLogin:
    def __init__(
        self,
        identity: IdentitySettings,
        db: Engine,
        trail: Trail | None = None,
        shared: SharedThrottle | None = None,
        sessions: Sessions | None = None,
        create_key: bool = True,
    ):
        assert identity.ldap is not None, "directory sign-in needs identity.ldap"
        self.directory = LdapDirectory(identity.ldap)
        #: Shared with the console's IdP sign-in when both are configured (one secret, one table).
        self.sessions = sessions or Sessions(identity, db, create_key)
        self.mappings = identity.group_mappings
        self.period = identity.group_cache_seconds
        self.db = db
        self.trail = trail
        #: username → (when the directory was last asked, the mapping it gave then)
        self.checked: dict[str, tuple[float, GroupMapping | None]] = {}
        self.throttle = LoginThrottle(identity.login_max_failures, identity.login_lockout_seconds)
        #: With `limits.backend: redis`: failures counted across every replica too.
        self.shared = shared
        self._sweeper: asyncio.Task[None] | None = None

    def map(self, groups: tuple[str, ...]) -> GroupMapping | None:
        return first_mapping(self.mappings, groups)

    async def login(self, username: str, password: str, source: str | None) -> dict[str, Any]:
        who = (f"user:{normalised(username)}", f"source:{source}")
        reserved = self.throttle.reserve(who)
        shared = None
        try:
            if self.shared is not None:
                shared = await self.shared.reserve(who)
        except RateLimited:
            self.throttle.release(who, reserved)
            raise
        try:
            user = await self.directory.authenticate(username, password)
        except LoginFailed:
            raise AuthenticationFailed(
                "Invalid username or password.", code="invalid_credentials"
            ) from None
        except DirectoryUnavailable as exc:
            await self._release(who, reserved, shared)
            log.error("directory unavailable for a login: %s", exc.reason)
            raise DirectoryDown("The directory cannot be reached; try again shortly.") from None
        await self._release(who, reserved, shared)
        self.throttle.succeeded(who[0])
        mapping = self.map(user.groups)
        if mapping is None:
            raise not_mapped(user.username)
        self.checked[user.username] = (time.monotonic(), mapping)
        token, expires = await asyncio.to_thread(
            self.sessions.issue, user.username, mapping.team, mapping.role
        )
        return {
            "token": token,
            "expires_at": expires,
            "user": user.username,
            "team": mapping.team,
            "role": mapping.role,
        }

    async def principal(
        self, token: str, teams: dict[str, Team], revoked: SessionRevocations
    ) -> Principal:
        claims = self.sessions.verify(token)
        if claims.get("jti") in revoked:
            raise AuthenticationFailed(
                "This session was ended (signed out or revoked): sign in again.",
                code="session_revoked",
            )
        user = str(claims["sub"])
        mapping = await self._current(user)
        if mapping is None or (mapping.team, mapping.role) != (claims["team"], claims["role"]):
            raise AuthenticationFailed(
                "Your directory groups changed since you signed in: sign in again.",
                code="session_revoked",
            )
        return mapped_principal(mapping, teams, user, "ses", user)

    async def _release(self, who: tuple[str, ...], reserved: float, shared: str | None) -> None:
        self.throttle.release(who, reserved)
        if self.shared is not None:
            await self.shared.release(who, shared)

    async def _current(self, user: str) -> GroupMapping | None:
        seen = self.checked.get(user)
        if seen is not None and time.monotonic() - seen[0] < self.period:
            return seen[1]
        try:
            entry = await self.directory.groups_of(user)
        except DirectoryUnavailable as exc:
            log.error("directory unavailable re-checking %s: %s", user, exc.reason)
            raise DirectoryDown("The directory cannot be reached; try again shortly.") from None
        mapping = self.map(entry.groups) if entry is not None else None
        self.checked[user] = (time.monotonic(), mapping)
        return mapping

    # -- keeping self-service keys in step with the directory --------------------------------------
    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="bastion-key-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.sweep()
            except Exception:
                log.exception("self-service key sweep failed; retrying next period")

    async def sweep(self) -> int:
        """Revokes self-service keys (and sessions) of users the directory no longer maps to
        their team; returns how many keys it revoked."""
        revoked = 0
        owners = await asyncio.to_thread(self_service_owners, self.db)
        for user, key_teams in owners.items():
            entry = await self.directory.groups_of(user)
            mapping = self.map(entry.groups) if entry is not None else None
            self.checked[user] = (time.monotonic(), mapping)
            keep = mapping.team if mapping is not None and mapping.role in CALLERS else None
            if keep is not None and key_teams == {keep}:
                continue
            if mapping is None:
                await self._end_sessions(user)
            for rec in await asyncio.to_thread(self_service_keys, self.db, user, keep):
                async with recorded_change(
                    self.trail,
                    "directory-sweep",
                    "key.revoke",
                    takes_access_away=True,
                    team=rec.team,
                    before=rec.public(),
                    reason=f"{user} is no longer mapped to team {rec.team}",
                ):
                    await asyncio.to_thread(revoke_key, self.db, rec.id)
                revoked += 1
                log.warning(
                    "revoked self-service key %s of %s: group membership ended", rec.id, user
                )
        return revoked

    async def _end_sessions(self, user: str) -> None:
        async with recorded_change(
            self.trail, "directory-sweep", "session.revoke", takes_access_away=True,
            user=user, reason=f"{user} is no longer mapped to any team (left, or disabled)",
        ):  # fmt: skip
            await asyncio.to_thread(revoke_sessions, self.db, "directory-sweep", user=user)
