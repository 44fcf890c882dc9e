"""`/admin/approvals`: the second administrator's side of four eyes (`identity.approvals`)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter

from bastion.core.changes import recorded_change
from bastion.core.errors import PermissionDenied
from bastion.identity import approvals
from bastion.identity.access import Access, Admin

router = APIRouter(prefix="/admin/approvals", tags=["four-eyes approvals"])


@router.get("")
def get_approvals(
    ctx: Admin, status: Literal["pending", "approved", "rejected", "expired"] | None = None
) -> list[dict[str, Any]]:
    return approvals.listing(ctx.db, status)


@router.get("/{approval_id}")
def get_approval(approval_id: str, ctx: Admin) -> dict[str, Any]:
    return approvals.get(ctx.db, approval_id)


def _second_person(ctx: Access) -> None:
    if not ctx.actor.person:
        raise PermissionDenied(
            "Approvals are decided by a person: a signed-in administrator or the admin key, "
            "not an API key (whoever made the key could be the requester).",
            code="four_eyes",
        )
    if ctx.actor.name == "admin-key" and not key_may_approve(ctx.settings):
        raise PermissionDenied(
            "Approvals are decided by a signed-in administrator here: the admin key's holder "
            "may also be a named administrator, and so approve their own request "
            "(admin.key_may_approve).",
            code="four_eyes",
        )


def key_may_approve(settings: Any) -> bool:
    if settings.admin.key_may_approve is not None:
        return bool(settings.admin.key_may_approve)
    return not any(m.role == "admin" for m in settings.identity.group_mappings)


@router.post("/{approval_id}/approve")
async def approve(approval_id: str, ctx: Admin) -> dict[str, Any]:
    """Approves another administrator's request, and carries it out."""
    return await _decide(approval_id, ctx, True)


@router.post("/{approval_id}/reject")
async def reject(approval_id: str, ctx: Admin) -> dict[str, Any]:
    return await _decide(approval_id, ctx, False)


async def _decide(approval_id: str, ctx: Access, approve: bool) -> dict[str, Any]:
    _second_person(ctx)
    pending = await asyncio.to_thread(approvals.get, ctx.db, approval_id)
    trail, verb = ctx.state.audit, "approve" if approve else "reject"
    async with recorded_change(trail, ctx.actor.name, f"approval.{verb}", team=pending["team"],
                               before=pending):  # fmt: skip
        decided = await asyncio.to_thread(
            approvals.decide, ctx.db, approval_id, ctx.actor.name, approve
        )
    follow = approvals.EXECUTORS.get((decided["action"], decided["status"]))
    if follow is None:
        return decided
    async with recorded_change(trail, ctx.actor.name, f"{decided['action']}.{decided['status']}",
                               team=decided["team"], approval=approval_id,
                               requested_by=decided["requested_by"],
                               subject=decided["subject"]):  # fmt: skip
        result = await follow(ctx.state, decided)
    return {**decided, "result": result}
