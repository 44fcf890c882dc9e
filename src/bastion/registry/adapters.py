"""Adapter deployments: a registry adapter served under an alias (`bastion models deploy
legal@1 --to tiny:legal-v1`) on the deployments of its base.

The base is found through the config: the alias whose deployments declare
`registry: <the adapter's base>` (every one of them, so that any replica the alias routes to
can load it). A row in `adapter_deployments` is the deployment's whole state; every gateway
replica reads the table and makes its engines match it (`registry/serving.py`): it loads what
is deployed and unloads what is not, also after an engine restarts.

Two stages:
- **serve**: an approved adapter (on an approved base), callable by every key that may use the
  alias (a key with a model list must name it);
- **staging**: a validated or approved one, callable only by keys that name the alias in their
  model list: how a candidate is evaluated through the gateway before it is approved.

Retiring an adapter removes its deployments in the same transaction as the state change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine, delete, select

from bastion.core.errors import Conflict, InvalidRequest, NotFound
from bastion.core.settings import NAME
from bastion.registry import records
from bastion.store.schema import adapter_deployments

Stage = Literal["serve", "staging"]
#: The registry states each stage accepts.
STAGE_STATES: dict[str, tuple[str, ...]] = {
    "serve": ("approved",),
    "staging": ("validated", "approved"),
}


@dataclass(frozen=True, slots=True)
class AdapterDeployment:
    alias: str
    #: NAME@VERSION; also the name the engines serve it under (`lora_name`): unique per
    #: version, so moving an alias to a new version never serves the old weights by mistake.
    adapter: str
    base_alias: str
    stage: str
    #: Where the engines read it (the registered directory).
    path: str
    #: The adapter's registry state when read: one its stage does not accept (retired while
    #: being deployed, a database edit) keeps it off the engines.
    state: str = "approved"

    def public(self) -> dict[str, Any]:
        return {"alias": self.alias, "adapter": self.adapter, "base_alias": self.base_alias,
                "stage": self.stage, "path": self.path}  # fmt: skip


def base_alias(settings: Any, base_ref: str) -> str:
    """The config alias every deployment of which serves `base_ref` (409 if none does)."""
    for alias, model in settings.models.items():
        if model.deployments and all(d.registry == base_ref for d in model.deployments):
            return alias
    raise Conflict(
        f"No model alias serves the base '{base_ref}': an adapter is loaded on the deployments "
        f"of its base, so one alias's deployments must all declare `registry: {base_ref}`.",
        code="base_not_deployed",
    )


def check_alias(settings: Any, alias: str) -> None:
    if not re.match(NAME, alias):
        raise InvalidRequest(
            f"'{alias}' is not a model alias: letters, digits and . _ : / - (at most 128).",
            param="alias",
            code="invalid_value",
        )
    if alias in settings.models or alias in settings.routers:
        raise Conflict(
            f"'{alias}' is a model or router of the config; an adapter needs its own alias.",
            code="alias_taken",
        )


def deploy(
    db: Engine, settings: Any, ref: str, alias: str, stage: Stage = "serve"
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Checks that `ref` may be served under `alias` now and returns (the row to write, the
    deployment it replaces or None). The adapter must be in a state its stage accepts, on an
    approved base, with its files as registered."""
    check_alias(settings, alias)
    rec = records.get(db, *records.parse_ref(ref))
    if rec["kind"] != "adapter":
        raise Conflict(
            f"'{ref}' is a base model: bases are served by config deployments "
            "(`registry:`); only adapters are deployed to an alias.",
            code="not_an_adapter",
        )
    states = STAGE_STATES[stage]
    if rec["state"] not in states:
        hint = " (a validated one may be deployed with --staging, for evaluation)" * (
            stage == "serve" and rec["state"] == "validated"
        )
        raise Conflict(
            f"'{ref}' is {rec['state']}: a {stage} deployment needs it "
            f"{' or '.join(states)}{hint}.",
            code="model_not_approved",
        )
    base = records.get(db, *records.parse_ref(rec["base"]))
    if base["state"] != "approved":
        raise Conflict(
            f"'{ref}' is an adapter of '{rec['base']}', which is {base['state']}.",
            code="base_not_approved",
        )
    records.model_dir(db, ref, states)  # its files as registered (409 hash_mismatch)
    row = {"alias": alias, "adapter": ref, "base_alias": base_alias(settings, rec["base"]),
           "stage": stage}  # fmt: skip
    return row, get(db, alias)


def write(db: Engine, row: dict[str, Any], by: str) -> AdapterDeployment:
    """Deploys (or moves the alias to) the row's adapter."""
    full = {**row, "created_by": by, "created_at": datetime.now(UTC)}
    with db.begin() as conn:
        conn.execute(delete(adapter_deployments).where(adapter_deployments.c.alias == row["alias"]))
        conn.execute(adapter_deployments.insert(), full)
    found = get(db, row["alias"])
    assert found is not None
    return _target(db, found)


def get(db: Engine, alias: str) -> dict[str, Any] | None:
    with db.connect() as conn:
        row = conn.execute(
            select(adapter_deployments).where(adapter_deployments.c.alias == alias)
        ).first()
    return _public(row) if row is not None else None


def undeploy(db: Engine, alias: str) -> dict[str, Any]:
    """Removes a deployment (404 if the alias serves no adapter); returns what it was."""
    with db.begin() as conn:
        row = conn.execute(
            select(adapter_deployments).where(adapter_deployments.c.alias == alias)
        ).first()
        if row is None:
            raise NotFound(f"No adapter is deployed as '{alias}'.", code="deployment_not_found")
        conn.execute(delete(adapter_deployments).where(adapter_deployments.c.alias == alias))
    return _public(row)


def listing(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(adapter_deployments).order_by(adapter_deployments.c.alias))
        return [_public(r) for r in rows]


def active(db: Engine) -> list[AdapterDeployment]:
    """Every deployment, with its adapter's directory and registry state (one query)."""
    from bastion.store.schema import registry_models

    query = select(adapter_deployments, registry_models.c.path, registry_models.c.state).join(
        registry_models,
        (registry_models.c.name + "@" + registry_models.c.version) == adapter_deployments.c.adapter,
    )
    with db.connect() as conn:
        return [
            AdapterDeployment(r.alias, r.adapter, r.base_alias, r.stage, r.path, r.state)
            for r in conn.execute(query)
        ]


def alias_of(db: Engine, ref: str) -> str | None:
    """An alias `ref` is deployed under (serve preferred over staging), or None."""
    rows = [r for r in listing(db) if r["adapter"] == ref]
    rows.sort(key=lambda r: r["stage"] != "serve")
    return rows[0]["alias"] if rows else None


def _target(db: Engine, row: dict[str, Any]) -> AdapterDeployment:
    rec = records.get(db, *records.parse_ref(row["adapter"]))
    return AdapterDeployment(
        row["alias"], row["adapter"], row["base_alias"], row["stage"], rec["path"], rec["state"]
    )


def _public(row: Any) -> dict[str, Any]:
    m = row._mapping
    at = m["created_at"]
    return {
        "alias": m["alias"],
        "adapter": m["adapter"],
        "base_alias": m["base_alias"],
        "stage": m["stage"],
        "created_by": m["created_by"],
        "created_at": (at if at.tzinfo else at.replace(tzinfo=UTC)).isoformat(),
    }
