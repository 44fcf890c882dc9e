"""`/auth/…`: directory sign-in and self-service keys.

`POST /auth/login` turns directory credentials into a session token (`bastion login` calls it);
`POST /auth/logout` ends it (or, with `everywhere`, every session of the user) on every replica.
A signed-in user (session token or SSO JWT) may mint API keys for their own team, living at most
`identity.self_service_key_max_days`, and see and revoke their own keys — never anyone else's
(404, as if it did not exist). Logins, failed ones included, sign-outs and key changes are
written to the audit trail.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import Field

from bastion.core.bounds import Body, Duration, Label, Text, UserName
from bastion.core.changes import recorded_change
from bastion.core.errors import BastionError, InvalidRequest, NotFound, PermissionDenied
from bastion.core.timeutil import parse_duration
from bastion.identity.keys import get_key, list_keys, new_key, revoke_key
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS
from bastion.identity.sessions import SESSION_PREFIX, revoke_sessions
from bastion.identity.teams import IdentityError

if TYPE_CHECKING:  # python-ldap is an optional extra
    from bastion.identity.ldap_login import DirectoryLogin
    from bastion.identity.oidc_login import Flow

router = APIRouter(prefix="/auth", tags=["sign-in and self-service keys"])


#: A password goes to the directory as it is: any text but NUL (LDAP cannot carry it).
Password = Text(1024, min_length=1)


class LoginIn(Body):
    username: UserName
    password: Password = Field(repr=False)


class SelfKeyIn(Body):
    name: Label = Field("", description="A label, e.g. the application.")
    expires_in: Duration | None = Field(
        None,
        description="Lifetime, e.g. 30d; at most (and by default) "
        "`identity.self_service_key_max_days`.",
    )


class LogoutIn(Body):
    everywhere: bool = Field(False, description="End every session of this user, not only this.")


async def _record(request: Request, kind: str, **fields: Any) -> None:
    trail = request.app.state.audit
    if trail is not None:
        await trail.event(kind, **fields)


def _login(request: Request) -> DirectoryLogin:
    login = request.app.state.keys.login
    if login is None:
        raise NotFound("Directory sign-in is not configured (identity.ldap).", code="not_found")
    return login  # type: ignore[no-any-return]


@router.post("/login")
async def login(body: LoginIn, request: Request) -> dict[str, Any]:
    return await sign_in(request, body)


async def sign_in(request: Request, body: LoginIn) -> dict[str, Any]:
    """A directory sign-in, throttled and audited; the console's sign-in form calls it too."""
    directory = _login(request)
    source = request.client.host if request.client else None
    try:
        result = await directory.login(body.username, body.password, source)
    except BastionError as exc:
        await _record(
            request, "auth", actor=body.username, action="login.failed", source=source,
            reason=exc.code,
        )  # fmt: skip
        raise
    await _record(
        request, "auth", actor=result["user"], action="login", team=result["team"],
        source=source, after={"role": result["role"]},
    )  # fmt: skip
    return result


async def idp_sign_in(request: Request, flow: Flow, params: dict[str, str]) -> dict[str, Any]:
    """The console's IdP sign-in finished (oidc_login.py), audited as a directory sign-in is:
    the same `auth` records, `login` or `login.failed`, with `method: oidc`."""
    keys = request.app.state.keys
    source = request.client.host if request.client else None
    actor = "(unknown)"  # until the ID token says who it is
    try:
        if keys.idp_login is None:
            raise NotFound("Console sign-in at an IdP is not configured.", code="not_found")
        who = await keys.idp_login.finish(flow, params)
        actor = who.user
        done = await keys.idp_login.admit(who, keys.teams)
    except BastionError as exc:
        await _record(
            request, "auth", actor=actor, action="login.failed", source=source,
            reason=exc.code, method="oidc", idp=flow.issuer,
        )  # fmt: skip
        raise
    await _record(
        request, "auth", actor=done.identity.user, action="login", team=done.mapping.team,
        source=source, after={"role": done.mapping.role}, method="oidc", idp=flow.issuer,
    )  # fmt: skip
    return {"token": done.token, "expires_at": done.expires_at, "user": done.identity.user,
            "team": done.mapping.team, "role": done.mapping.role}  # fmt: skip


@router.post("/logout")
async def logout(
    request: Request,
    body: LogoutIn | None = None,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Ends this session token (from `bastion login`), or every session of its user."""
    state = request.app.state
    who: Principal = await state.keys.authenticate(authorization)
    token = (authorization or "").partition(" ")[2].strip()
    if not token.startswith(SESSION_PREFIX) or state.keys.sessions is None:
        raise PermissionDenied(  # this credential may not do it: like sign_in_required
            "Only a session token from `bastion login` can sign out; an SSO token ends at its "
            "identity provider, an API key is revoked.",
            code="not_a_session",
        )
    everywhere = body is not None and body.everywhere
    jti = None if everywhere else state.keys.sessions.verify(token)["jti"]
    async with recorded_change(
        state.audit, who.name, "session.revoke", takes_access_away=True, team=who.team,
        user=who.user, reason="signed out everywhere" if everywhere else "signed out",
    ):  # fmt: skip
        ended = await asyncio.to_thread(
            revoke_sessions, state.db, who.name, jti=jti, user=who.user if everywhere else None
        )
    for ended_jti, expires in ended:
        state.keys.revoked_sessions.add(ended_jti, expires)
    return {"sessions_ended": len(ended)}


async def signed_in(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    who: Principal = await request.app.state.keys.authenticate(authorization)
    if not who.signed_in or who.user is None:
        raise PermissionDenied(
            "Self-service keys need a signed-in user (bastion login, or your SSO token).",
            code="sign_in_required",
        )
    return who


User = Annotated[Principal, Depends(signed_in)]


def _mine(request: Request, who: Principal, key_id: str) -> Any:
    rec = get_key(request.app.state.db, key_id)
    if rec is None or rec.user != who.user or rec.team != who.team:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return rec


@router.get("/keys")
async def my_keys(request: Request, who: User) -> list[dict[str, Any]]:
    keys = await asyncio.to_thread(list_keys, request.app.state.db, who.team)
    now = datetime.now(UTC)
    return [k.public(now) for k in keys if k.user == who.user]


@router.post("/keys", status_code=201)
async def mint_key(body: SelfKeyIn, request: Request, who: User) -> dict[str, Any]:
    if who.role not in CALLERS:
        raise PermissionDenied("Auditors create no keys to call models.", code="role_not_allowed")
    state = request.app.state
    longest = timedelta(days=state.settings.identity.self_service_key_max_days)
    expires = parse_duration(body.expires_in) if body.expires_in else longest
    if expires > longest:  # a well-formed request the policy does not allow
        raise PermissionDenied(
            f"expires_in is longer than the {longest.days} days self-service keys may live "
            "(identity.self_service_key_max_days)",
            param="expires_in",
            code="lifetime_not_allowed",
        )
    try:
        made = await asyncio.to_thread(
            lambda: new_key(
                state.db, team=who.team, user=who.user, name=body.name, expires_in=expires,
                known_models={*state.settings.models, *state.settings.routers}, created_by=who.name,
                source="sso" if who.key_id.startswith("sso_") else "self-service",
            )
        )  # fmt: skip
    except (IdentityError, ValueError) as exc:
        raise InvalidRequest(str(exc), code="invalid_value") from None
    rec = made.record
    async with recorded_change(
        state.audit, who.name, "key.create", team=who.team, after=rec.public()
    ):
        await asyncio.to_thread(made.save, state.db)
    return {**rec.public(), "key": made.token}


@router.post("/keys/{key_id}/revoke")
async def revoke_my_key(key_id: str, request: Request, who: User) -> dict[str, Any]:
    state = request.app.state
    before = await asyncio.to_thread(_mine, request, who, key_id)
    async with recorded_change(
        state.audit,
        who.name,
        "key.revoke",
        takes_access_away=True,
        team=who.team,
        before=before.public(),
    ):
        rec = await asyncio.to_thread(revoke_key, state.db, key_id)
    state.keys.update(rec)
    return rec.public()  # type: ignore[no-any-return]
