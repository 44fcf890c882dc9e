"""`/admin/models/…/deploy` and `/admin/models/deployments`: adapters served under an alias,
over HTTP (the same operations as `bastion models deploy|undeploy|deployments`).

Reading needs admin, team-admin or auditor; deploying and undeploying need admin. Each change is
an `admin` entry in the audit trail (`model.deploy`, `model.undeploy`) before it is made. Every
gateway replica then loads or unloads the adapter on its engines within
`registry.adapter_refresh_s`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from bastion.core.bounds import Body, Text
from bastion.core.changes import recorded_change
from bastion.core.errors import NotFound
from bastion.core.settings import NAME
from bastion.identity.access import Admin, Reader
from bastion.registry import adapters
from bastion.registry.api import ModelName, Version

router = APIRouter(prefix="/admin/models", tags=["model registry"])


class DeployIn(Body):
    alias: str = Field(
        pattern=NAME, max_length=128, description="The model name clients call, e.g. tiny:legal-v1."
    )
    stage: Literal["serve", "staging"] = Field(
        "serve",
        description="serve: an approved adapter, for every key that may use the alias. "
        "staging: a validated one, only for keys that name the alias (evaluation).",
    )


class UndeployIn(Body):
    alias: str = Field(pattern=NAME, max_length=128, description="The alias to stop serving.")
    reason: Text(4000, min_length=1) = Field(  # type: ignore[valid-type]
        description="Why it is taken out of service."
    )


@router.get("/deployments")
def list_deployments(ctx: Reader) -> list[dict[str, Any]]:
    return adapters.listing(ctx.db)


@router.post("/{name}/{version}/deploy", status_code=201)
async def deploy(name: ModelName, version: Version, body: DeployIn, ctx: Admin) -> dict[str, Any]:
    """Serves an adapter under `alias` on the deployments of its base (or moves the alias to
    this version): approved for `serve`, validated or approved for `staging`, files as
    registered."""
    ref = f"{name}@{version}"
    row, replaced = await asyncio.to_thread(
        adapters.deploy, ctx.db, ctx.settings, ref, body.alias, body.stage
    )
    async with recorded_change(
        ctx.state.audit, ctx.actor.name, "model.deploy", model=ref, before=replaced, after=row
    ):
        done = await asyncio.to_thread(adapters.write, ctx.db, row, ctx.actor.name)
    return done.public()


@router.post("/undeploy")
async def undeploy(body: UndeployIn, ctx: Admin) -> dict[str, Any]:
    """Stops serving the alias: every gateway unloads the adapter from its engines."""
    alias = body.alias
    current = await asyncio.to_thread(adapters.get, ctx.db, alias)
    if current is None:
        raise NotFound(f"No adapter is deployed as '{alias}'.", code="deployment_not_found")
    async with recorded_change(
        ctx.state.audit, ctx.actor.name, "model.undeploy", model=current["adapter"],
        before=current,
        reason=body.reason,
    ):  # fmt: skip
        return await asyncio.to_thread(adapters.undeploy, ctx.db, alias)
