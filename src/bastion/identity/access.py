"""Who is acting on the control plane (`/admin`, `/audit` administration), and the FastAPI
dependencies that demand a role of them.

The actor is the admin key (`admin.key`, compared in constant time), or any key, session or
SSO token whose role the endpoint accepts. What the app shares with the handlers (settings,
database, key store) is read from `request.app.state`, set once by the app's assembly.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy import Engine

from bastion.config import Settings
from bastion.core.errors import AuthenticationFailed, PermissionDenied
from bastion.identity.keystore import KeyStore
from bastion.identity.oidc import looks_like_jwt
from bastion.identity.roles import Actor


@dataclass(frozen=True)
class Access:
    """The acting user or key, and what the handler works with."""

    actor: Actor
    request: Request

    @property
    def settings(self) -> Settings:
        return self.request.app.state.settings  # type: ignore[no-any-return]

    @property
    def db(self) -> Engine:
        return self.request.app.state.db  # type: ignore[no-any-return]

    @property
    def keys(self) -> KeyStore:
        return self.request.app.state.keys  # type: ignore[no-any-return]

    @property
    def state(self) -> Any:
        return self.request.app.state


def bearer_is(authorization: str | None, expected: str) -> bool:
    """`Authorization: Bearer <expected>`, compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode()
    )


async def acting(request: Request, authorization: str | None) -> Actor:
    state = request.app.state
    expected = state.settings.admin.key
    if expected is not None and bearer_is(authorization, expected):
        return Actor("admin", None, "admin-key", person=True)
    token = (authorization or "").partition(" ")[2].strip()
    if not token.startswith(("bst-", "bss-")) and not looks_like_jwt(token):
        raise AuthenticationFailed(
            "A valid admin key or a signed-in administrator is required for /admin.",
            code="invalid_admin_key",
        )
    who = await state.keys.authenticate(authorization)
    return Actor(who.role, who.team, who.name, person=who.signed_in)


def requires(*roles: str) -> Any:
    """A dependency: the caller's `Access`, if their role is one of `roles` (else 403)."""

    async def dependency(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Access:
        actor = await acting(request, authorization)
        if actor.role not in roles:
            raise PermissionDenied(
                f"This needs the {' or '.join(roles)} role.", code="role_not_allowed"
            )
        return Access(actor, request)

    return dependency


Admin = Annotated[Access, Depends(requires("admin"))]
Manager = Annotated[Access, Depends(requires("admin", "team-admin"))]
Reader = Annotated[Access, Depends(requires("admin", "team-admin", "auditor"))]
