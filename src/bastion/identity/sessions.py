"""Session tokens: what `bastion login` hands out after a directory login.

A session token is `bss-` + a JWT (HS256) signed with the gateway's session secret, naming the
user, the team and role their groups mapped to at login, and an expiry. The secret comes from
$BASTION_SESSION_KEY or `identity.session_key_file` (created on first start, mode 0600); every
replica needs the same one. Tokens are short-lived, and the directory is asked again every
`identity.group_cache_seconds` whether the user still belongs (see ldap_login.py).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from bastion.core.errors import AuthenticationFailed
from bastion.identity.settings import IdentitySettings

log = logging.getLogger("bastion.identity")
SESSION_PREFIX = "bss-"
SESSION_KEY_ENV = "BASTION_SESSION_KEY"
ISSUER = "bastion-session"


def load_session_key(identity: IdentitySettings) -> bytes:
    if text := os.environ.get(SESSION_KEY_ENV):
        return base64.b64decode(text)
    path = Path(identity.session_key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        log.warning("created the session signing secret %s (share it with every replica)", path)
    return base64.b64decode(path.read_text().strip())


class Sessions:
    def __init__(self, identity: IdentitySettings):
        self._key = load_session_key(identity)
        if len(self._key) < 32:
            raise ValueError("the session key must be at least 32 bytes (base64)")
        self.ttl = identity.session_ttl_seconds

    def issue(self, user: str, team: str, role: str) -> tuple[str, int]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user,
            "team": team,
            "role": role,
            "iat": now,
            "exp": now + self.ttl,
            "jti": secrets.token_hex(8),
        }
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
