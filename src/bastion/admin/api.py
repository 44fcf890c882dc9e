"""The admin HTTP API (`/admin/…`): teams, cost centers, keys and usage.

Protected by the admin key (`admin.key` / BASTION_ADMIN_KEY). Handlers are sync functions, so
FastAPI runs their database work in its thread pool, off the event loop. The OpenAPI document
is served at `/admin/openapi.json`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio.from_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from bastion.config import NAME, LimitSettings, Settings
from bastion.gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    LimitsUnavailable,
    NotFound,
)
from bastion.identity import directory
from bastion.identity.keys import (
    KeyStore,
    create_key,
    get_key,
    list_keys,
    revoke_key,
    set_key_limits,
)
from bastion.metering.reports import summarize
from bastion.policy.admission import BACKEND_ERRORS, Admission
from bastion.policy.status import limit_status
from bastion.timeutil import parse_duration, parse_time


@dataclass
class AdminContext:
    settings: Settings
    db: Engine
    keys: KeyStore
    admission: Admission


def _ctx(request: Request) -> AdminContext:
    return request.app.state.admin  # type: ignore[no-any-return]


def require_admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> AdminContext:
    ctx = _ctx(request)
    expected = ctx.settings.admin.key
    scheme, _, token = (authorization or "").partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(token.strip().encode(), expected.encode())
    ):
        raise AuthenticationFailed(
            "A valid admin key is required for /admin.", code="invalid_admin_key"
        )
    return ctx


Admin = Annotated[AdminContext, Depends(require_admin)]
router = APIRouter(prefix="/admin", tags=["admin"])


class CostCenterIn(BaseModel):
    name: str = Field(pattern=NAME)
    display_name: str = ""


class TeamIn(BaseModel):
    name: str = Field(pattern=NAME)
    cost_center: str
    models: list[str] | None = None


class KeyIn(BaseModel):
    team: str
    user: str | None = None
    models: list[str] | None = Field(None, description="Aliases this key may use (none: all).")
    expires_in: str | None = Field(None, description="e.g. 30d, 12h; none: never expires.")
    name: str = ""
    limits: LimitSettings | None = Field(
        None, description="This key's own limits (none: `limits.defaults.key`)."
    )
    role: Literal["member", "auditor"] = Field(
        "member", description="member: calls models; auditor: reads the audit trail only."
    )


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
    status: Literal["active", "expired", "revoked"]
    limits: dict[str, float] | None
    role: str


class NewKeyOut(KeyOut):
    key: str = Field(description="The secret key. Shown only in this response.")


def _record(request: Request, action: str, **fields: Any) -> None:
    """Writes the change to the audit trail (from the worker thread sync handlers run in)."""
    trail = request.app.state.audit
    if trail is not None:
        anyio.from_thread.run(
            functools.partial(trail.event, "admin", actor="admin-key", action=action, **fields)
        )


def _bad(exc: Exception) -> InvalidRequest:
    return InvalidRequest(str(exc), code="invalid_value")


@router.get("/cost-centers")
def get_cost_centers(ctx: Admin) -> list[dict[str, str]]:
    return directory.list_cost_centers(ctx.db)


@router.post("/cost-centers", status_code=201)
def post_cost_center(body: CostCenterIn, ctx: Admin, request: Request) -> dict[str, str]:
    try:
        directory.create_cost_center(ctx.db, body.name, body.display_name)
    except directory.DirectoryError as exc:
        raise _bad(exc) from None
    _record(request, "cost_center.create", after=body.model_dump())
    return {"name": body.name, "display_name": body.display_name, "source": "api"}


@router.get("/teams")
def get_teams(ctx: Admin) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "cost_center": t.cost_center,
            "source": t.source,
            "models": sorted(t.models) if t.models is not None else None,
        }
        for t in sorted(directory.load_teams(ctx.db).values(), key=lambda t: t.name)
    ]


@router.post("/teams", status_code=201)
def post_team(body: TeamIn, ctx: Admin, request: Request) -> dict[str, Any]:
    try:
        directory.create_team(ctx.db, ctx.settings, body.name, body.cost_center, body.models)
    except directory.DirectoryError as exc:
        raise _bad(exc) from None
    _record(request, "team.create", team=body.name, after=body.model_dump())
    return {
        "name": body.name,
        "cost_center": body.cost_center,
        "models": body.models,
        "source": "api",
    }


@router.get("/keys")
def get_keys(ctx: Admin, team: str | None = None) -> list[KeyOut]:
    now = datetime.now(UTC)
    return [KeyOut(**k.public(now)) for k in list_keys(ctx.db, team)]  # type: ignore[arg-type]


@router.post("/keys", status_code=201)
def post_key(body: KeyIn, ctx: Admin, request: Request) -> NewKeyOut:
    try:
        expires = parse_duration(body.expires_in) if body.expires_in else None
        rec, token = create_key(
            ctx.db,
            team=body.team,
            user=body.user,
            models=body.models,
            expires_in=expires,
            name=body.name,
            known_models=set(ctx.settings.models),
            limits=body.limits,
            role=body.role,
        )
    except (directory.DirectoryError, ValueError) as exc:
        raise _bad(exc) from None
    try:
        _record(request, "key.create", team=rec.team, after=rec.public())
    except Exception:
        revoke_key(ctx.db, rec.id)  # nothing unrecorded stays usable
        raise
    return NewKeyOut(key=token, **rec.public())  # type: ignore[arg-type]


@router.get("/keys/{key_id}")
def get_one_key(key_id: str, ctx: Admin) -> KeyOut:
    rec = get_key(ctx.db, key_id)
    if rec is None:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return KeyOut(**rec.public())  # type: ignore[arg-type]


@router.post("/keys/{key_id}/revoke")
def post_revoke(key_id: str, ctx: Admin, request: Request) -> KeyOut:
    try:
        rec = revoke_key(ctx.db, key_id)
    except directory.DirectoryError:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found") from None
    ctx.keys.update(rec)  # immediate on this replica; others pick it up on their next poll
    _record(request, "key.revoke", team=rec.team, after=rec.public())
    return KeyOut(**rec.public())  # type: ignore[arg-type]


@router.put("/keys/{key_id}/limits")
def put_key_limits(key_id: str, body: LimitSettings, ctx: Admin, request: Request) -> KeyOut:
    """Replaces the key's own limits; an empty object returns it to `limits.defaults.key`."""
    before = get_key(ctx.db, key_id)
    try:
        rec = set_key_limits(ctx.db, key_id, body)
    except directory.DirectoryError:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found") from None
    ctx.keys.update(rec)
    _record(
        request,
        "key.limits",
        team=rec.team,
        before=before.public() if before else None,
        after=rec.public(),
    )
    return KeyOut(**rec.public())  # type: ignore[arg-type]


@router.get("/limits")
async def get_limits(ctx: Admin, team: str | None = None) -> list[dict[str, Any]]:
    """Usage against every configured limit (of one team, its cost center and its keys)."""
    keys = await asyncio.to_thread(list_keys, ctx.db, team)
    try:
        return await limit_status(ctx.admission, ctx.settings, keys, team)
    except BACKEND_ERRORS as exc:
        raise LimitsUnavailable(f"The limits backend is unreachable: {exc}") from None


@router.get("/usage")
def get_usage(
    ctx: Admin,
    by: Literal["team", "cost-center", "model", "day", "key", "user"] = "team",
    since: Annotated[str | None, Query(description="e.g. 7d or 2026-11-01")] = None,
    until: str | None = None,
    team: str | None = None,
) -> list[dict[str, Any]]:
    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as exc:
        raise _bad(exc) from None
    return summarize(ctx.db, by, start, end, team)
