"""Session tokens: what `bastion login` hands out after a directory login.

A session token is `bss-` + a JWT (HS256) signed with the gateway's session secret, naming the
user, the team and role their groups mapped to at login, and an expiry. The secret comes from
$BASTION_SESSION_KEY or `identity.session_key_file` (created on first start, mode 0600); every
replica needs the same one. Tokens are short-lived, and the directory is asked again every
`identity.group_cache_seconds` whether the user still belongs (see ldap_login.py).

Every issued session is recorded (`sessions` table) so it can be revoked before it expires:
by `POST /auth/logout`, by an administrator offboarding the user, or when the directory no
longer maps the user. Revocations take a number of the `sessions` change sequence and reach
every replica's `SessionRevocations` within `identity.key_refresh_seconds`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import Engine, select

from bastion.core.errors import AuthenticationFailed, DeploymentError
from bastion.identity.settings import IdentitySettings
from bastion.store.changes import next_change
from bastion.store.schema import sessions

log = logging.getLogger("bastion.identity")
SESSION_PREFIX = "bss-"
SESSION_KEY_ENV = "BASTION_SESSION_KEY"
ISSUER = "bastion-session"


def load_session_key(identity: IdentitySettings, create: bool = True) -> bytes:
    """From $BASTION_SESSION_KEY, else the key file; created there only if `create` (the
    embedded database), else a missing key stops the start: replicas must share one."""
    if text := os.environ.get(SESSION_KEY_ENV):
        return base64.b64decode(text)
    path = Path(identity.session_key_file)
    if not path.exists() and not create:
        raise DeploymentError(
            f"no session key: set {SESSION_KEY_ENV} or put it at identity.session_key_file "
            f"({path}); it is created on first start only with the embedded SQLite database, "
            "since every replica sharing a database must sign sessions with the same key "
            "(`bastion secrets init --dir DIR` makes one; see docs/deploy.md)"
        )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        log.warning("created the session signing secret %s (share it with every replica)", path)
    return base64.b64decode(path.read_text().strip())


class SessionRevocations:
    """Ids of revoked sessions that have not expired yet (expired ones are refused anyway)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def add(self, jti: str, expires: datetime | float) -> None:
        if isinstance(expires, datetime):  # SQLite hands back naive datetimes: all UTC
            expires = (expires if expires.tzinfo else expires.replace(tzinfo=UTC)).timestamp()
        until = expires
        self._until[jti] = until

    def __contains__(self, jti: object) -> bool:
        return jti in self._until

    def prune(self) -> None:
        now = time.time()
        for jti in [j for j, until in self._until.items() if until < now]:
            del self._until[jti]


class Sessions:
    def __init__(self, identity: IdentitySettings, db: Engine, create_key: bool = True):
        self._key = load_session_key(identity, create_key)
        if len(self._key) < 32:
            raise ValueError("the session key must be at least 32 bytes (base64)")
        self.ttl = identity.session_ttl_seconds
        self.db = db

    def derive(self, purpose: str) -> bytes:
        """A secret for another purpose (the console's CSRF tokens), the same on every replica
        that shares the session key, and useless for forging sessions."""
        return hmac.new(self._key, b"bastion:" + purpose.encode(), hashlib.sha256).digest()

    def issue(
        self, user: str, team: str, role: str, ttl: int | None = None, **extra: str
    ) -> tuple[str, int]:
        """A signed session token, recorded so that it can be revoked (blocking: a thread).
        `extra` claims name an IdP sign-in's issuer and subject (`idp`, `idp_sub`)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            **extra,
            "iss": ISSUER,
            "sub": user,
            "team": team,
            "role": role,
            "iat": now,
            "exp": now + min(ttl or self.ttl, self.ttl),
            "jti": secrets.token_hex(16),
        }
        with self.db.begin() as conn:
            conn.execute(
                sessions.insert().values(
                    jti=claims["jti"], user=user, team=team, role=role,
                    issued_at=datetime.fromtimestamp(now, UTC),
                    expires_at=datetime.fromtimestamp(claims["exp"], UTC),
                    change_seq=next_change(conn, "sessions"),
                )
            )  # fmt: skip
        return SESSION_PREFIX + jwt.encode(claims, self._key, algorithm="HS256"), claims["exp"]

    def verify(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(  # type: ignore[no-any-return]
                token.removeprefix(SESSION_PREFIX),
                self._key,
                algorithms=["HS256"],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed(
                "Your session has expired: sign in again (bastion login).", code="session_expired"
            ) from None
        except jwt.PyJWTError:
            raise AuthenticationFailed("Invalid session token.", code="invalid_token") from None


def revoke_sessions(
    db: Engine, by: str, *, jti: str | None = None, user: str | None = None
) -> list[tuple[str, datetime]]:
    """Revokes one session, or every live session of a user; returns (id, expiry) of each."""
    assert (jti is None) != (user is None)
    now = datetime.now(UTC)
    where = sessions.c.revoked_at.is_(None) & (sessions.c.expires_at > now)
    where &= (sessions.c.jti == jti) if jti is not None else (sessions.c.user == user)
    with db.begin() as conn:
        found = conn.execute(select(sessions.c.jti, sessions.c.expires_at).where(where)).all()
        if found:
            conn.execute(
                sessions.update().where(sessions.c.jti.in_([r.jti for r in found])),
                {"revoked_at": now, "revoked_by": by, "change_seq": next_change(conn, "sessions")},
            )
    return [(r.jti, r.expires_at) for r in found]
