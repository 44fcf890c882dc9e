"""`/admin/models`: the model registry over HTTP (the same operations as `bastion models`).

Reading the inventory needs admin, team-admin or auditor; every change needs admin. Each change
is an `admin` entry in the audit trail before it is made (`core/changes.py`). With
`registry.approval: four-eyes`, approving is a request (202) that a second person decides at
`/admin/approvals/{id}`; neither the requester nor the decider may be the registrant.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from pydantic import AfterValidator, ConfigDict, Field, StringConstraints

from bastion.core.bounds import Body, Line, Text, _encodable
from bastion.core.changes import recorded_change
from bastion.core.errors import Conflict, NotFound, PermissionDenied
from bastion.identity import approvals
from bastion.identity.access import Access, Admin, Reader
from bastion.registry import gates, records
from bastion.registry.cache import DigestCache
from bastion.registry.digests import DigestError, digest_dir, mismatches

router = APIRouter(prefix="/admin/models", tags=["model registry"])
log = logging.getLogger("bastion.registry")

ModelName = Annotated[str, PathParam(pattern=records.NAME_RE.pattern, max_length=63)]
Version = Annotated[str, PathParam(pattern=records.VERSION_RE.pattern, max_length=64)]
Evidence = Text(4000, min_length=1)


#: A directory on the gateway's host: absolute (the gateway's working directory is no one's).
AbsolutePath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096, pattern=r"^/[^\x00-\x1f\x7f]*$"),
    AfterValidator(_encodable),
]
#: NAME@VERSION: at most 63 + 1 + 64 characters, so it fits the audit trail's `model` column.
REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"


class LineageIn(Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    training_data_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Manifest digest of the training data."
    )
    hyperparameters: dict[str, Any] | None = Field(None, description="Free JSON.")
    notes: Text(4000) | None = None  # type: ignore[valid-type]


class _Register(Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: AbsolutePath = Field(
        description="The model directory, absolute, as the gateway's host sees it: it holds a "
        "config.json, adapter_config.json or .gguf file at its top.",
    )
    name: str = Field(pattern=records.NAME_RE.pattern, max_length=63)
    version: str = Field(pattern=records.VERSION_RE.pattern, max_length=64)
    license: Line(256) | None = None  # type: ignore[valid-type]
    owner: Line(256) | None = None  # type: ignore[valid-type]
    intended_use: Text(4000) | None = None  # type: ignore[valid-type]
    risk_tier: Literal["low", "medium", "high", "critical"] | None = None
    lineage: LineageIn | None = None


class RegisterBase(_Register):
    kind: Literal["base"]


class RegisterAdapter(_Register):
    kind: Literal["adapter"]
    base: str = Field(
        pattern=REF, max_length=200, description="The base it was trained on: NAME@VERSION."
    )


RegisterIn = Annotated[RegisterBase | RegisterAdapter, Field(discriminator="kind")]


class EvidenceIn(Body):
    evidence: Evidence = Field(  # type: ignore[valid-type]
        description="What supports this step: an evaluation report, a ticket, a committee minute."
    )


class RetireIn(Body):
    reason: Evidence = Field(description="Why it is retired.")  # type: ignore[valid-type]


def _change(ctx: Access, action: str, rec: dict[str, Any] | str, **fields: Any) -> Any:
    ref = rec if isinstance(rec, str) else rec["ref"]
    return recorded_change(ctx.state.audit, ctx.actor.name, action, model=ref, **fields)


@router.get("")
def list_models(
    ctx: Reader,
    state: Literal["draft", "validated", "approved", "retired"] | None = None,
    name: Annotated[str | None, Query(pattern=records.NAME_RE.pattern, max_length=63)] = None,
) -> list[dict[str, Any]]:
    return records.listing(ctx.db, state, name)


@router.get("/{name}/{version}")
def show_model(name: ModelName, version: Version, ctx: Reader) -> dict[str, Any]:
    return records.get(ctx.db, name, version)


@router.get("/{name}/{version}/gates")
def check_gates(name: ModelName, version: Version, ctx: Reader) -> list[dict[str, Any]]:
    """The promotion gates that apply to this version and where it stands on each now (what
    approving it would check), without approving anything."""
    return gates.evaluate(ctx.db, ctx.settings, records.get(ctx.db, name, version))


@router.post("", status_code=201)
async def register(body: RegisterIn, ctx: Admin) -> dict[str, Any]:
    """Hashes every file of the directory and records the version as `draft`."""
    path = Path(body.path)
    try:
        files = await asyncio.to_thread(digest_dir, path, None, None, DigestCache(ctx.db, False))
    except DigestError as exc:  # what the path names is not there (as a model directory)
        raise NotFound(str(exc), code="model_dir_not_found") from None
    row = await asyncio.to_thread(
        lambda: records.new_record(
            ctx.db, path, files, name=body.name, version=body.version, kind=body.kind,
            created_by=ctx.actor.name, base=getattr(body, "base", None), license=body.license,
            owner=body.owner,
            intended_use=body.intended_use, risk_tier=body.risk_tier,
            lineage=body.lineage.model_dump(exclude_none=True) if body.lineage else None,
        )
    )  # fmt: skip
    after = {k: row[k] for k in ("kind", "path", "manifest_sha256", "base", "owner", "risk_tier")}
    async with _change(ctx, "model.register", f"{body.name}@{body.version}", after=after):
        return await asyncio.to_thread(records.insert, ctx.db, row)


@router.post("/{name}/{version}/validate")
async def validate(
    name: ModelName, version: Version, body: EvidenceIn, ctx: Admin
) -> dict[str, Any]:
    """draft → validated: the files are hashed again and must match; the record complete."""
    rec = await asyncio.to_thread(records.get, ctx.db, name, version)
    to = await asyncio.to_thread(records.check_transition, ctx.db, rec, "validate")
    changed = await asyncio.to_thread(
        mismatches, Path(rec["path"]), rec["files"], None, None, DigestCache(ctx.db, False)
    )
    if changed:
        raise Conflict(
            f"'{rec['ref']}' cannot be validated: its files at {rec['path']} changed since "
            f"registration ({'; '.join(changed[:5])}).",
            code="hash_mismatch",
        )
    return await _move(ctx, rec, to, body.evidence)


@router.post(
    "/{name}/{version}/approve",
    responses={
        202: {
            "description": "Under four-eyes: asked; a second person decides it at "
            "/admin/approvals/{id} (the model stays validated)."
        }
    },
)
async def approve(
    name: ModelName, version: Version, body: EvidenceIn, ctx: Admin, response: Response
) -> dict[str, Any]:
    """validated → approved; with four-eyes, a request (202) a second person decides."""
    rec = await asyncio.to_thread(records.get, ctx.db, name, version)
    to = await asyncio.to_thread(records.check_transition, ctx.db, rec, "approve")
    four_eyes = ctx.settings.registry.approval == "four-eyes"
    if four_eyes and ctx.actor.name == rec["created_by"]:
        raise PermissionDenied(
            f"'{rec['ref']}' was registered by {rec['created_by']}: under four-eyes approval "
            "someone else must ask for, and decide, its approval.",
            code="four_eyes",
        )
    # Promotion gates (409 gate_failed): checked before a request is even made, and again when
    # the second person decides (runs may change in between).
    passed = await asyncio.to_thread(gates.check, ctx.db, ctx.settings, rec)
    if not four_eyes:
        return await _move(ctx, rec, to, body.evidence, **({"gates": passed} if passed else {}))
    subject = {"model": rec["ref"], "evidence": body.evidence, "not_by": [rec["created_by"]]}
    if passed:
        subject["gates"] = passed  # what the decider sees; checked again at the decision
    asked = await approvals.ask(ctx, "model.approve", None, subject)
    await asyncio.to_thread(records.set_pending, ctx.db, rec, asked["id"])
    response.status_code = 202
    return {**await asyncio.to_thread(records.get, ctx.db, name, version), "approval": asked}


@router.post("/{name}/{version}/retire")
async def retire(name: ModelName, version: Version, body: RetireIn, ctx: Admin) -> dict[str, Any]:
    rec = await asyncio.to_thread(records.get, ctx.db, name, version)
    to = await asyncio.to_thread(records.check_transition, ctx.db, rec, "retire")
    return await _move(ctx, rec, to, body.reason)


async def _move(
    ctx: Access, rec: dict[str, Any], to: str, evidence: str, **extra: Any
) -> dict[str, Any]:
    verb = records.TRANSITIONS[rec["state"], to]
    async with _change(ctx, f"model.{verb}", rec, before={"state": rec["state"]},
                       after={"state": to}, evidence=evidence, **extra):  # fmt: skip
        return await asyncio.to_thread(
            records.transition, ctx.db, rec, to, ctx.actor.name, evidence, **extra
        )


@approvals.executes("model.approve")
async def _approved(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    """The second person approved: validated → approved, by them, on the requester's ask.
    (The decision itself is already in the trail as `model.approve.approved`.)"""
    rec = await asyncio.to_thread(
        records.get, state.db, *records.parse_ref(approval["subject"]["model"])
    )
    if rec["approval"] != approval["id"] or rec["state"] != "validated":  # retired meanwhile
        raise Conflict(f"'{rec['ref']}' no longer waits for this request.", code="conflict")
    try:
        passed = await asyncio.to_thread(gates.check, state.db, state.settings, rec)
    except Conflict:
        # Blocked now: the version is free for a new request once the evidence is there.
        await asyncio.to_thread(records.set_pending, state.db, rec, None)
        raise
    extra: dict[str, Any] = {"approval": approval["id"], "requested_by": approval["requested_by"]}
    if passed:
        extra["gates"] = passed
    # The decision's own entry (`model.approve.approved`) was written before the gates were
    # checked again: this one records the change with the evidence it was made on.
    async with recorded_change(state.audit, approval["decided_by"], "model.approve",
                               model=rec["ref"], before={"state": "validated"},
                               after={"state": "approved"},
                               evidence=approval["subject"]["evidence"], **extra):  # fmt: skip
        return await asyncio.to_thread(
            records.transition, state.db, rec, "approved", approval["decided_by"],
            approval["subject"]["evidence"], **extra,
        )  # fmt: skip


@approvals.executes("model.approve", "rejected")
async def _rejected(state: Any, approval: dict[str, Any]) -> dict[str, Any]:
    """Rejected: the version stays validated, free for a new request."""
    rec = await asyncio.to_thread(
        records.get, state.db, *records.parse_ref(approval["subject"]["model"])
    )
    if rec["approval"] == approval["id"]:
        await asyncio.to_thread(records.set_pending, state.db, rec, None)
    return await asyncio.to_thread(records.get, state.db, rec["name"], rec["version"])
