"""Four eyes: changes one administrator may only ask for, made when a second one approves.

An auditor key (with `admin.four_eyes`), releasing a legal hold and shredding a team's audit
contents are requested by one administrator and carried out only when another approves. The
approver must be a different person, and a person at all: a signed-in administrator (the
directory or the IdP vouches for them) or the admin key (the break-glass holder). An API key
cannot approve: whoever made it could be the requester. Requests expire after
`admin.approval_ttl_hours`; each request and decision is in the audit trail.

Each action registers what carrying it out means (`executes`); the decision and the change
happen in that order, and a failure leaves the request approved with the error recorded.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from bastion.core.changes import recorded_change
from bastion.core.errors import Conflict, NotFound, PermissionDenied
from bastion.store.schema import approvals

#: What carrying out each action means: (app state, the approval) → a result to show.
Executor = Callable[[Any, dict[str, Any]], Awaitable[dict[str, Any]]]
#: (action, "approved" | "rejected") → what follows that decision.
EXECUTORS: dict[tuple[str, str], Executor] = {}


def executes(action: str, decision: str = "approved") -> Callable[[Executor], Executor]:
    def register(fn: Executor) -> Executor:
        EXECUTORS[action, decision] = fn
        return fn

    return register


def _utc(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def _public(row: Any) -> dict[str, Any]:
    when = {k: _utc(getattr(row, k)) for k in ("requested_at", "decided_at", "expires_at")}
    status = row.status
    if status == "pending" and when["expires_at"] <= datetime.now(UTC):  # type: ignore[operator]
        status = "expired"
    return {
        "id": row.id,
        "action": row.action,
        "team": row.team,
        "subject": row.subject,
        "requested_by": row.requested_by,
        "status": status,
        "decided_by": row.decided_by,
        **{k: v.isoformat() if v else None for k, v in when.items()},
    }


def new_id() -> str:
    return "apr_" + secrets.token_hex(8)


def request(
    db: Engine, action: str, subject: dict[str, Any], requested_by: str, ttl: timedelta,
    team: str | None = None, approval_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    assert (action, "approved") in EXECUTORS, action
    now = datetime.now(UTC)
    row = {
        "id": approval_id or new_id(),
        "action": action,
        "team": team,
        "subject": subject,
        "requested_by": requested_by,
        "requested_at": now,
        "status": "pending",
        "decided_by": None,
        "decided_at": None,
        "expires_at": now + ttl,
    }
    with db.begin() as conn:
        conn.execute(approvals.insert(), row)
    return get(db, str(row["id"]))


def get(db: Engine, approval_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        row = conn.execute(select(approvals).where(approvals.c.id == approval_id)).first()
    if row is None:
        raise NotFound(f"No approval request '{approval_id}'.", code="approval_not_found")
    return _public(row)


def listing(db: Engine, status: str | None = None) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(approvals).order_by(approvals.c.requested_at)).all()
    found = [_public(r) for r in rows]
    return [a for a in found if status is None or a["status"] == status]


def decide(db: Engine, approval_id: str, by: str, approve: bool) -> dict[str, Any]:
    """Approves or rejects a pending request, once: a concurrent second decision gets 409."""
    current = get(db, approval_id)
    if current["status"] != "pending":
        raise Conflict(
            f"Approval request '{approval_id}' is {current['status']}, not pending.",
            code="approval_not_pending",
        )
    if by == current["requested_by"]:
        raise PermissionDenied(
            "A second, distinct administrator must approve or reject this request.",
            code="four_eyes",
        )
    # `subject.not_by`: people an action excludes besides the requester (a model's registrant).
    if by in (current["subject"] or {}).get("not_by", ()):
        raise PermissionDenied(
            f"{by} may not decide this request (for a model: its registrant); a third person must.",
            code="four_eyes",
        )
    now = datetime.now(UTC)
    with db.begin() as conn:
        done = conn.execute(
            approvals.update().where(
                (approvals.c.id == approval_id)
                & (approvals.c.status == "pending")
                & (approvals.c.expires_at > now)
            ),
            {"status": "approved" if approve else "rejected", "decided_by": by, "decided_at": now},
        )
    if done.rowcount != 1:
        raise Conflict(f"Approval request '{approval_id}' was decided meanwhile.",
                       code="approval_not_pending")  # fmt: skip
    return get(db, approval_id)


async def ask(
    ctx: Any, action: str, team: str | None, subject: dict[str, Any],
    approval_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Records and stores a request for a second administrator (`ctx`: the asker's Access)."""
    ttl = timedelta(hours=ctx.settings.admin.approval_ttl_hours)
    approval_id = approval_id or new_id()
    async with recorded_change(
        ctx.state.audit, ctx.actor.name, "approval.request", team=team,
        after={"id": approval_id, "action": action, **subject},
    ):  # fmt: skip
        return await asyncio.to_thread(
            request, ctx.db, action, subject, ctx.actor.name, ttl, team, approval_id
        )
