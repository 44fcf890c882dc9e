"""The admin HTTP API (`/admin/…`): teams, cost centers, keys, approvals, offboarding, usage.

Protected by the admin key (`admin.key` / BASTION_ADMIN_KEY) or a credential with the role an
endpoint accepts. A team-admin manages only the member keys of their own team, attributed to
themselves or to no one. An auditor key is never one administrator's doing: auditors come from
the identity provider's group mappings, or (with `admin.four_eyes`) a second administrator
approves the key before it works. The OpenAPI document is served at `/admin/openapi.json`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from bastion.core.bounds import Body, Duration, Label, LimitsIn, ModelList, Name, TimeSpec, UserName
from bastion.core.changes import recorded_change
from bastion.core.errors import (
    BastionError,
    Conflict,
    InvalidRequest,
    LimitsUnavailable,
    NotFound,
    PermissionDenied,
)
from bastion.core.timeutil import parse_duration, parse_time
from bastion.identity import approvals, teams
from bastion.identity.access import Access, Admin, Manager, Reader
from bastion.identity.keys import (
    KeyRecord,
    activate_key,
    get_key,
    list_keys,
    new_key,
    revoke_key,
    set_key_limits,
)
from bastion.identity.roles import ROLE_HELP, Role
from bastion.identity.sessions import revoke_sessions
from bastion.limits.admission import BACKEND_ERRORS
from bastion.limits.status import limit_status
from bastion.metering.reports import summarize

router = APIRouter(prefix="/admin", tags=["admin"])


class CostCenterIn(Body):
    name: Name
    display_name: Label = ""


class TeamIn(Body):
    name: Name
    cost_center: Name
    models: ModelList | None = None


class KeyIn(Body):
    team: Name
    user: UserName | None = None
    models: ModelList | None = Field(None, description="Aliases this key may use (none: all).")
    expires_in: Duration | None = Field(None, description="e.g. 30d, 12h; none: never expires.")
    name: Label = ""
    limits: LimitsIn | None = Field(
        None, description="This key's own limits (none: `limits.defaults.key`)."
    )
    role: Role = Field("member", description=ROLE_HELP + ".")


class KeyOut(BaseModel):
    id: str
    prefix: str
    name: str
    team: str
    user: str | None
    models: list[str] | None
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    status: Literal["active", "expired", "revoked", "pending"]
    limits: dict[str, int | str] | None  # budgets as exact decimal strings
    role: str
    source: str
    created_by: str | None = Field(description="The authenticated principal that made it.")
    approval: str | None = Field(description="The approval it waits for (status `pending`).")


class NewKeyOut(KeyOut):
    key: str = Field(description="The secret key. Shown only in this response.")


def _change(ctx: Access, action: str, **fields: Any) -> Any:
    """Records the change first; it is made inside the block (see `bastion.core.changes`)."""
    return recorded_change(ctx.state.audit, ctx.actor.name, action, **fields)


def _bad(exc: Exception) -> BastionError:
    """An identity operation refused: 404 for a name that does not exist, 409 for one taken."""
    if isinstance(exc, teams.UnknownName):
        return NotFound(str(exc), code="not_found")
    if isinstance(exc, teams.NameTaken):
        return Conflict(str(exc), code="already_exists")
    return InvalidRequest(str(exc), code="invalid_value")


@router.get("/cost-centers")
def get_cost_centers(ctx: Admin) -> list[dict[str, str]]:
    return teams.list_cost_centers(ctx.db)


@router.post("/cost-centers", status_code=201)
async def post_cost_center(body: CostCenterIn, ctx: Admin) -> dict[str, str]:
    try:
        async with _change(ctx, "cost_center.create", after=body.model_dump()):
            await asyncio.to_thread(teams.create_cost_center, ctx.db, body.name, body.display_name)
    except teams.IdentityError as exc:
        raise _bad(exc) from None
    return {"name": body.name, "display_name": body.display_name, "source": "api"}


@router.get("/teams")
def get_teams(ctx: Manager) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "cost_center": t.cost_center,
            "source": t.source,
            "models": sorted(t.models) if t.models is not None else None,
        }
        for t in sorted(teams.load_teams(ctx.db).values(), key=lambda t: t.name)
        if ctx.actor.may_manage(t.name)
    ]


@router.post("/teams", status_code=201)
async def post_team(body: TeamIn, ctx: Admin) -> dict[str, Any]:
    try:
        async with _change(ctx, "team.create", team=body.name, after=body.model_dump()):
            await asyncio.to_thread(
                teams.create_team, ctx.db, ctx.settings, body.name, body.cost_center, body.models
            )
    except teams.IdentityError as exc:
        raise _bad(exc) from None
    return {
        "name": body.name,
        "cost_center": body.cost_center,
        "models": body.models,
        "source": "api",
    }


@router.get("/keys")
def get_keys(ctx: Manager, team: Name | None = None) -> list[KeyOut]:
    now = datetime.now(UTC)
    return [KeyOut(**k.public(now)) for k in list_keys(ctx.db, ctx.actor.team_scope(team))]  # type: ignore[arg-type]


@router.post("/keys", status_code=201)
async def post_key(body: KeyIn, ctx: Manager) -> NewKeyOut:
    """A key; an auditor key (with `admin.four_eyes`) is `pending` until another admin approves."""
    ctx.actor.team_scope(body.team)
    _may_create(ctx, body)
    try:
        ctx.settings.limits.defaults.key.tightened(body.limits)
        expires = parse_duration(body.expires_in) if body.expires_in else None
        made = await asyncio.to_thread(
            lambda: new_key(
                ctx.db,
                team=body.team,
                user=body.user,
                models=body.models,
                expires_in=expires,
                name=body.name,
                known_models={*ctx.settings.models, *ctx.settings.routers},
                limits=body.limits,
                role=body.role,
                created_by=ctx.actor.name,
                approval=approvals.new_id() if body.role == "auditor" else None,
            )
        )
    except (teams.IdentityError, ValueError) as exc:
        raise _bad(exc) from None
    rec = made.record
    async with _change(ctx, "key.create", team=rec.team, after=rec.public()):
        await asyncio.to_thread(made.save, ctx.db)
    if rec.approval is not None:
        await approvals.ask(ctx, "key.create", rec.team, {"key_id": rec.id}, rec.approval)
    return NewKeyOut(key=made.token, **rec.public())  # type: ignore[arg-type]


def _may_create(ctx: Access, body: KeyIn) -> None:
    actor = ctx.actor
    if body.role == "auditor" and not ctx.settings.admin.four_eyes:
        raise PermissionDenied(
            "Auditors come from the identity provider (identity.group_mappings with role "
            "auditor); with admin.four_eyes, an auditor key needs a second admin's approval.",
            code="auditor_needs_second_admin",
        )
    if actor.role == "admin":
        return
    if body.role != "member":
        raise PermissionDenied("Only an admin creates keys with roles.", code="role_not_allowed")
    if body.user is not None and not (actor.person and body.user == actor.name):
        raise PermissionDenied(
            "A team-admin attributes keys only to themselves or to no one.",
            code="user_not_allowed",
        )


@approvals.executes("key.create")
async def _activate(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    rec = await asyncio.to_thread(activate_key, state.db, approval["subject"]["key_id"])
    state.keys.update(rec)
    return {"key": rec.public()}


@approvals.executes("key.create", "rejected")
async def _discard(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    rec = await asyncio.to_thread(revoke_key, state.db, approval["subject"]["key_id"])
    state.keys.update(rec)
    return {"key": rec.public()}


@router.get("/keys/{key_id}")
def get_one_key(key_id: str, ctx: Manager) -> KeyOut:
    return KeyOut(**_managed_key(ctx, key_id).public())  # type: ignore[arg-type]


def _managed_key(ctx: Access, key_id: str) -> KeyRecord:
    """The key, if the actor may manage it; otherwise 404, as if it did not exist."""
    rec = get_key(ctx.db, key_id)
    if rec is None or not ctx.actor.may_manage(rec.team, rec.role):
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return rec


@router.post("/keys/{key_id}/revoke")
async def post_revoke(key_id: str, ctx: Manager) -> KeyOut:
    before = await asyncio.to_thread(_managed_key, ctx, key_id)
    try:
        async with _change(
            ctx, "key.revoke", team=before.team, before=before.public(), takes_access_away=True
        ):
            rec = await asyncio.to_thread(revoke_key, ctx.db, key_id)
    except teams.IdentityError:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found") from None
    ctx.keys.update(rec)  # immediate on this replica; others pick it up on their next poll
    return KeyOut(**rec.public())  # type: ignore[arg-type]


@router.put("/keys/{key_id}/limits")
async def put_key_limits(key_id: str, body: LimitsIn, ctx: Manager) -> KeyOut:
    """Replaces the key's own limits, which only tighten `limits.defaults.key` (each field the
    smaller of the two); an empty object leaves the defaults alone."""
    before = await asyncio.to_thread(_managed_key, ctx, key_id)
    try:
        ctx.settings.limits.defaults.key.tightened(body)
    except ValueError as exc:
        raise _bad(exc) from None
    after = {"limits": body.model_dump(mode="json", exclude_none=True) or None}
    try:
        async with _change(
            ctx, "key.limits", team=before.team, before=before.public(), after=after
        ):
            rec = await asyncio.to_thread(set_key_limits, ctx.db, key_id, body)
    except teams.IdentityError:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found") from None
    ctx.keys.update(rec)
    return KeyOut(**rec.public())  # type: ignore[arg-type]


@router.get("/limits")
async def get_limits(ctx: Manager, team: Name | None = None) -> list[dict[str, Any]]:
    """Usage against every configured limit (of one team, its cost center and its keys)."""
    team = ctx.actor.team_scope(team)
    keys = await asyncio.to_thread(list_keys, ctx.db, team)
    try:
        return await limit_status(ctx.state.admission, ctx.settings, keys, team)
    except BACKEND_ERRORS as exc:
        raise LimitsUnavailable(f"The limits backend is unreachable: {exc}") from None


@router.get("/usage")
def get_usage(
    ctx: Reader,
    by: Literal["team", "cost-center", "model", "day", "key", "user"] = "team",
    since: Annotated[TimeSpec | None, Query()] = None,
    until: TimeSpec | None = None,
    team: Name | None = None,
) -> list[dict[str, Any]]:
    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as exc:
        raise _bad(exc) from None
    return summarize(ctx.db, by, start, end, ctx.actor.team_scope(team))


@router.post("/users/{user}/offboard")
async def offboard(user: str, ctx: Admin) -> dict[str, Any]:
    """Ends every session of `user` and revokes every live key attributed to them, on every
    replica within `identity.key_refresh_seconds` (at once on this one)."""
    async with _change(ctx, "user.offboard", user=user, takes_access_away=True):
        ended = await asyncio.to_thread(revoke_sessions, ctx.db, ctx.actor.name, user=user)
        revoked = []
        for rec in await asyncio.to_thread(list_keys, ctx.db):
            if rec.user == user and rec.revoked_at is None:
                rec = await asyncio.to_thread(revoke_key, ctx.db, rec.id)
                ctx.keys.update(rec)
                revoked.append(rec.id)
    for jti, expires in ended:
        ctx.keys.revoked_sessions.add(jti, expires)
    return {"user": user, "sessions_ended": len(ended), "keys_revoked": revoked}
