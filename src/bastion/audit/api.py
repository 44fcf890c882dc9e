"""`/audit/…`: the trail, for auditors only; and `/admin/audit/…`: holds, shredding, purging.

Only a key with the `auditor` role reads the trail (the admin key cannot: administering the
platform and reading what staff asked are separate duties). Every read is appended to the
trail itself — who searched for what — before any data is returned. No endpoint edits or
deletes an entry; shredding destroys a team's data key, purging drops expired contents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from bastion.audit import reader, store
from bastion.audit.anchor import AnchorError
from bastion.audit.chain import Verdict
from bastion.audit.keys import KeyOperationError, shred_team
from bastion.audit.trail import AuditTrail
from bastion.audit.verify import trusted_keys, verify_store
from bastion.core.bounds import Body, Label, Line, Name, Text, TimeSpec, UserName
from bastion.core.changes import recorded_change
from bastion.core.errors import (
    AuditUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from bastion.core.timeutil import parse_time
from bastion.identity import approvals
from bastion.identity.access import Access, Admin
from bastion.identity.principal import Principal

#: An id or kind to search by (request ids are at most 64 characters in the store).
Key = Line(64)
#: Why a hold was placed: free text, kept with the hold.
Reason = Text(4096, min_length=3)


def _trail(request: Request) -> AuditTrail:
    trail = request.app.state.audit
    if trail is None:
        raise NotFound("The audit trail is disabled on this gateway.", code="audit_disabled")
    return trail  # type: ignore[no-any-return]


async def require_auditor(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> tuple[AuditTrail, Principal]:
    trail = _trail(request)
    principal = await request.app.state.keys.authenticate(authorization)
    if principal.role != "auditor":
        raise PermissionDenied(
            "Only auditor keys may read the audit trail.", code="auditor_role_required"
        )
    return trail, principal


Auditor = Annotated[tuple[AuditTrail, Principal], Depends(require_auditor)]
router = APIRouter(prefix="/audit", tags=["audit"])
admin_router = APIRouter(prefix="/admin/audit", tags=["audit administration"])


def _time(value: str | None, name: str) -> datetime | None:
    try:
        return parse_time(value) if value else None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=name) from None


async def _read(trail: AuditTrail, who: Principal, action: str, query: dict[str, Any]) -> None:
    """Recorded before the data leaves: a read that cannot be recorded does not happen."""
    try:
        await trail.event(
            "read",
            actor=who.name,
            action=action,
            key_id=who.key_id,
            team=None,
            query={k: v for k, v in query.items() if v is not None},
        )
    except Exception as exc:
        raise AuditUnavailable(
            "The audit trail cannot record this read, so nothing is returned. Try again shortly."
        ) from exc


@router.get("/entries")
async def search_entries(
    auditor: Auditor,
    since: TimeSpec | None = None,
    until: TimeSpec | None = None,
    team: Name | None = None,
    user: UserName | None = None,
    key_id: Key | None = None,
    model: Name | None = None,
    status: Annotated[int | None, Query(ge=100, le=599)] = None,
    kind: Key | None = None,
    request_id: Key | None = None,
    q: Annotated[Label | None, Query(description="Text to find in decrypted contents.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Entries, newest first, filtered by metadata and (q) by decrypted content."""
    trail, who = auditor
    query = reader.Query(
        _time(since, "since"), _time(until, "until"), team, user, key_id, model, status,
        kind, request_id, q, limit,
    )  # fmt: skip
    await _read(trail, who, "search", {**vars(query), "since": since, "until": until})
    return await asyncio.to_thread(reader.search, trail.db, trail.keys.wrapper, query)


@router.get("/requests/{request_id}")
async def show_request(request_id: str, auditor: Auditor) -> dict[str, Any]:
    """Everything recorded about one request: its request and completion entries."""
    trail, who = auditor
    await _read(trail, who, "show", {"request_id": request_id})
    found = await asyncio.to_thread(
        reader.search, trail.db, trail.keys.wrapper, reader.Query(request_id=request_id)
    )
    if not found["data"]:
        raise NotFound(f"No audit entry for request '{request_id}'.", code="entry_not_found")
    return {"request_id": request_id, "entries": list(reversed(found["data"]))}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One entry per line.",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
async def export(
    auditor: Auditor,
    since: TimeSpec | None = None,
    until: TimeSpec | None = None,
    team: Name | None = None,
) -> StreamingResponse:
    """JSON lines, verifiable offline with `bastion audit verify --file`."""
    trail, who = auditor
    start, end = _time(since, "since"), _time(until, "until")
    await _read(trail, who, "export", {"since": since, "until": until, "team": team})
    lines = reader.export(
        trail.db, trail.keys.wrapper, trusted_keys(trail.settings), start, end, team,
    )  # fmt: skip

    async def body() -> AsyncIterator[bytes]:
        sentinel = object()
        while (line := await asyncio.to_thread(next, lines, sentinel)) is not sentinel:
            yield line  # type: ignore[misc]

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.get("/verify")
async def verify(auditor: Auditor, since: TimeSpec | None = None) -> dict[str, Any]:
    trail, who = auditor
    await _read(trail, who, "verify", {"since": since})
    a = trail.settings
    try:
        verdict: Verdict = await asyncio.to_thread(
            verify_store, trail.db, trust=trusted_keys(a), since=_time(since, "since"),
            anchor_dir=Path(a.anchor_dir) if a.anchor_dir else None,
            max_unsigned_seconds=a.max_unsigned_seconds,
        )  # fmt: skip
    except AnchorError as exc:
        return {"ok": False, "reason": str(exc)}
    return vars(verdict)


# -- administration: holds, shredding, retention ---------------------------------------------
class HoldIn(Body):
    team: Name
    reason: Reason = Field(description="Why, e.g. the matter or case reference.")


class TeamIn(Body):
    team: Name


def _change(request: Request, ctx: Access, action: str, **fields: Any) -> Any:
    """Recorded first, made inside the block (`bastion.core.changes`)."""
    return recorded_change(_trail(request), ctx.actor.name, action, **fields)


@admin_router.get("/holds")
async def get_holds(ctx: Admin) -> list[dict[str, Any]]:
    return await asyncio.to_thread(store.holds, ctx.db)


@admin_router.post("/holds", status_code=201)
async def post_hold(body: HoldIn, request: Request, ctx: Admin) -> dict[str, Any]:
    async with _change(request, ctx, "audit.hold", team=body.team, after={"reason": body.reason}):
        placed = await asyncio.to_thread(
            store.place_hold, ctx.db, body.team, body.reason, ctx.actor.name
        )
    return {"team": body.team, "placed": placed}


@admin_router.delete("/holds/{team}", status_code=202)
async def delete_hold(team: str, ctx: Admin) -> dict[str, Any]:
    """Asks to lift a legal hold: done when a second administrator approves
    (`POST /admin/approvals/{id}/approve`). Answers the pending approval."""
    if not await asyncio.to_thread(store.on_hold, ctx.db, team):
        raise NotFound(f"Team '{team}' is not on hold.", code="hold_not_found")
    return await approvals.ask(ctx, "audit.release", team, {"team": team})


@approvals.executes("audit.release")
async def _release(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    team = approval["subject"]["team"]
    if not await asyncio.to_thread(store.release_hold, state.db, team):
        raise NotFound(f"Team '{team}' is not on hold.", code="hold_not_found")
    return {"team": team, "released": True}


@admin_router.post("/shred", status_code=202)
async def post_shred(body: TeamIn, ctx: Admin) -> dict[str, Any]:
    """Asks to crypto-shred a team's contents: done when a second administrator approves.
    Refused while the team is on legal hold or has content younger than
    `audit.min_retention_days` (checked again when approved)."""
    await asyncio.to_thread(_may_shred, ctx.settings, ctx.db, body.team)
    return await approvals.ask(ctx, "audit.shred", body.team, {"team": body.team})


def _may_shred(settings: Any, db: Any, team: str) -> None:
    if store.on_hold(db, team):
        raise Conflict(
            f"Team '{team}' is on legal hold: it cannot be shredded.", param="team",
            code="legal_hold",
        )  # fmt: skip
    floor = settings.audit.min_retention_days
    newest = store.newest_content(db, team) if floor else None
    if newest is not None and newest > datetime.now(UTC) - timedelta(days=floor):
        raise Conflict(
            f"Team '{team}' has content from {newest:%Y-%m-%d}, younger than the "
            f"{floor}-day retention floor (audit.min_retention_days): it cannot be shredded yet.",
            param="team",
            code="retention_floor",
        )


@approvals.executes("audit.shred")
async def _shred(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    """Destroys the team's data keys and rotates the master key (keys.py), so the contents
    stay unreadable even in a database backup restored with the old master key."""
    team, trail = approval["subject"]["team"], state.audit
    await asyncio.to_thread(_may_shred, state.settings, state.db, team)
    try:
        out = await asyncio.to_thread(shred_team, trail.settings, state.db, team, state.settings)
    except (store.AuditStoreError, KeyOperationError) as exc:
        raise Conflict(str(exc), param="team", code="legal_hold") from None
    trail.keys.cache.pop(team, None)
    return {"team": team, **out}


@admin_router.post("/purge")
async def post_purge(request: Request, ctx: Admin) -> dict[str, Any]:
    """Drops contents past each team's retention (metadata and hashes stay)."""
    cutoffs = await asyncio.to_thread(store.purge_cutoffs, ctx.db, retention_map(ctx.settings))
    async with _change(request, ctx, "audit.purge", after={"cutoffs": cutoffs}):
        purged = await asyncio.to_thread(store.purge, ctx.db, cutoffs)
    return {"purged": purged}


def retention_map(settings: Any) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    if settings.audit.retention_days is not None:
        out[None] = settings.audit.retention_days
    for name, team in settings.teams.items():
        if team.audit_retention_days is not None:
            out[name] = team.audit_retention_days
    return out
