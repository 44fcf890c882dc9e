"""The model inventory: registry records and their state machine.

    draft ──validate──▶ validated ──approve──▶ approved
      │                    │                      │
      └───────retire───────┴────────retire────────┴──▶ retired

- **draft**: registered; files hashed, metadata as given. Nothing may serve it.
- **validated**: its files were hashed again and match, its documentation is complete (owner,
  license, intended use, risk tier) and evidence of its validation is recorded.
- **approved**: someone who may approve did (and, with `registry.approval: four-eyes`, a second
  person); an adapter only on an approved base. Only approved versions may serve.
- **retired**: final. A retired version is never served again; register a new version.

Records are immutable but for their state: a change of files or metadata is a new version.
Each transition is a compare-and-set on the state it starts from, so two administrators
racing get one success and one 409, never a history that skips a step.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from bastion.core.errors import Conflict, InvalidRequest, NotFound
from bastion.registry.digests import FileDigest, config_summary, manifest_digest, mismatches
from bastion.registry.lineage import from_card
from bastion.store.schema import adapter_deployments, registry_models

State = Literal["draft", "validated", "approved", "retired"]
STATES: tuple[str, ...] = ("draft", "validated", "approved", "retired")
#: The legal moves, and the verb that makes each.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("draft", "validated"): "validate",
    ("validated", "approved"): "approve",
    ("draft", "retired"): "retire",
    ("validated", "retired"): "retire",
    ("approved", "retired"): "retire",
}
VERB_TARGET = {"validate": "validated", "approve": "approved", "retire": "retired"}
RISK_TIERS = ("low", "medium", "high", "critical")
#: What a validated record must document (a model-risk inventory's minimum).
REQUIRED_FOR_VALIDATION = ("owner", "license", "intended_use", "risk_tier")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def parse_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` → (name, version); InvalidRequest if malformed."""
    name, sep, version = ref.partition("@")
    if not sep or not NAME_RE.match(name) or not VERSION_RE.match(version):
        raise InvalidRequest(
            f"'{ref}' is not a registry reference: expected NAME@VERSION, e.g. tiny-chat@2.",
            code="invalid_value",
        )
    return name, version


def check_name(name: str, version: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"'{name}' is not a model name: letters, digits, '.', '_', '-' (at most 63).",
            param="name",
            code="invalid_value",
        )
    if not VERSION_RE.match(version):
        raise InvalidRequest(
            f"'{version}' is not a version: letters, digits, '.', '_', '+', '-' (at most 64).",
            param="version",
            code="invalid_value",
        )


def _iso(dt: datetime) -> str:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).isoformat()


def public(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "name": m["name"],
        "version": m["version"],
        "ref": f"{m['name']}@{m['version']}",
        "kind": m["kind"],
        "state": m["state"],
        "path": m["path"],
        "manifest_sha256": m["manifest_sha256"],
        "files": m["files"],
        "config": m["config"],
        "license": m["license"],
        "owner": m["owner"],
        "intended_use": m["intended_use"],
        "risk_tier": m["risk_tier"],
        "base": m["base"],
        "lineage": m["lineage"],
        "created_by": m["created_by"],
        "created_at": _iso(m["created_at"]),
        "updated_at": _iso(m["updated_at"]),
        "history": m["history"],
        "approval": m["approval"],
        # The model card's eval evidence: the promotion gates its approval passed.
        "gates": next((h.get("gates", []) for h in reversed(m["history"])
                       if h.get("to") == "approved"), []),
    }  # fmt: skip


def get(db: Engine, name: str, version: str) -> dict[str, Any]:
    with db.connect() as conn:
        row = conn.execute(
            select(registry_models).where(
                (registry_models.c.name == name) & (registry_models.c.version == version)
            )
        ).first()
    if row is None:
        raise NotFound(f"No registered model '{name}@{version}'.", code="model_version_not_found")
    return public(row)


def listing(db: Engine, state: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    query = select(registry_models).order_by(registry_models.c.name, registry_models.c.created_at)
    if state is not None:
        query = query.where(registry_models.c.state == state)
    if name is not None:
        query = query.where(registry_models.c.name == name)
    with db.connect() as conn:
        return [public(r) for r in conn.execute(query)]


def new_record(
    db: Engine,
    path: Path,
    files: list[FileDigest],
    *,
    name: str,
    version: str,
    kind: str,
    created_by: str,
    base: str | None = None,
    license: str | None = None,
    owner: str | None = None,
    intended_use: str | None = None,
    risk_tier: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The row a registration stores (checked, not yet written): see `insert`."""
    check_name(name, version)
    if kind not in ("base", "adapter"):
        raise InvalidRequest("kind is base or adapter.", param="kind", code="invalid_value")
    if kind == "adapter":
        if base is None:
            raise InvalidRequest(
                "An adapter names the base it was trained on: --base NAME@VERSION.",
                param="base",
                code="invalid_value",
            )
        base_rec = get(db, *parse_ref(base))  # the base must be in the registry (404 otherwise)
        # Given lineage wins over the card's, field by field (the card is also a hashed file).
        lineage = {**from_card(path, base_rec), **(lineage or {})}
    elif base is not None:
        raise InvalidRequest("Only an adapter has a base.", param="base", code="invalid_value")
    if risk_tier is not None and risk_tier not in RISK_TIERS:
        raise InvalidRequest(
            f"risk tier is one of {', '.join(RISK_TIERS)}.", param="risk_tier", code="invalid_value"
        )
    now = datetime.now(UTC)
    return {
        "name": name,
        "version": version,
        "kind": kind,
        "state": "draft",
        "path": str(path.resolve()),
        "manifest_sha256": manifest_digest(files),
        "files": [f.public() for f in files],
        "config": config_summary(path),
        "license": license,
        "owner": owner,
        "intended_use": intended_use,
        "risk_tier": risk_tier,
        "base": base,
        "lineage": lineage or {},
        "created_by": created_by,
        "created_at": now,
        "updated_at": now,
        "history": [{"from": None, "to": "draft", "by": created_by, "at": now.isoformat()}],
        "approval": None,
    }


def insert(db: Engine, row: dict[str, Any]) -> dict[str, Any]:
    try:
        with db.begin() as conn:
            conn.execute(registry_models.insert(), row)
    except IntegrityError:
        raise Conflict(
            f"'{row['name']}@{row['version']}' is already registered; a changed model is a new "
            "version.",
            code="already_exists",
        ) from None
    return get(db, row["name"], row["version"])


def check_transition(db: Engine, rec: dict[str, Any], verb: str) -> str:
    """The state `verb` moves `rec` to, if the move is legal now; 409 otherwise."""
    to = VERB_TARGET[verb]
    if (rec["state"], to) not in TRANSITIONS:
        legal = sorted(VERB_TARGET_BY_STATE.get(rec["state"], ())) or ["none: it is final"]
        raise Conflict(
            f"'{rec['ref']}' is {rec['state']}: it cannot be {to} (legal from {rec['state']}: "
            f"{', '.join(legal)}).",
            code="illegal_transition",
        )
    if verb == "validate":
        missing = [f for f in REQUIRED_FOR_VALIDATION if not rec.get(f)]
        if missing:
            raise Conflict(
                f"'{rec['ref']}' cannot be validated: it does not document "
                f"{', '.join(missing)}. Register a new version with them.",
                code="incomplete_record",
            )
    if verb == "approve" and rec["kind"] == "adapter":
        base = get(db, *parse_ref(rec["base"]))
        if base["state"] != "approved":
            raise Conflict(
                f"'{rec['ref']}' is an adapter of '{rec['base']}', which is {base['state']}: "
                "its base must be approved first.",
                code="base_not_approved",
            )
    if verb == "approve" and _pending(db, rec["approval"]):
        raise Conflict(
            f"'{rec['ref']}' already waits for approval request '{rec['approval']}'.",
            code="approval_pending",
        )
    return to


def _pending(db: Engine, approval_id: str | None) -> bool:
    """Whether the four-eyes request a record points at can still be decided (an expired one
    must not hold the version forever)."""
    if approval_id is None:
        return False
    from bastion.identity import approvals

    try:
        return approvals.get(db, approval_id)["status"] == "pending"
    except NotFound:
        return False


VERB_TARGET_BY_STATE: dict[str, set[str]] = {}
for (_frm, _to), _verb in TRANSITIONS.items():
    VERB_TARGET_BY_STATE.setdefault(_frm, set()).add(_verb)


def transition(
    db: Engine, rec: dict[str, Any], to: str, by: str, evidence: str, **extra: Any
) -> dict[str, Any]:
    """Moves `rec` to `to`, if it is still in the state it was read in (else 409)."""
    now = datetime.now(UTC)
    step = {"from": rec["state"], "to": to, "by": by, "at": now.isoformat(), "evidence": evidence}
    step.update({k: v for k, v in extra.items() if v is not None})
    with db.begin() as conn:
        done = conn.execute(
            registry_models.update().where(
                (registry_models.c.name == rec["name"])
                & (registry_models.c.version == rec["version"])
                & (registry_models.c.state == rec["state"])
            ),
            {"state": to, "updated_at": now, "history": [*rec["history"], step],
             "approval": None},
        )  # fmt: skip
        if done.rowcount == 1 and to == "retired":
            # A retired version is never served again: its adapter aliases go with it, in the
            # same transaction (every gateway then unloads it from its engines).
            conn.execute(
                adapter_deployments.delete().where(adapter_deployments.c.adapter == rec["ref"])
            )
    if done.rowcount != 1:
        raise Conflict(f"'{rec['ref']}' was changed meanwhile; read it again.", code="conflict")
    return get(db, rec["name"], rec["version"])


def set_pending(db: Engine, rec: dict[str, Any], approval_id: str | None) -> None:
    """Marks (or clears) the four-eyes request a validated record waits for; 409 if it was
    moved meanwhile (the request then points at nothing and its approval changes nothing)."""
    with db.begin() as conn:
        done = conn.execute(
            registry_models.update().where(
                (registry_models.c.name == rec["name"])
                & (registry_models.c.version == rec["version"])
                & (registry_models.c.state == "validated")
            ),
            {"approval": approval_id},
        )
    if done.rowcount != 1 and approval_id is not None:
        raise Conflict(f"'{rec['ref']}' was changed meanwhile; read it again.", code="conflict")


def model_dir(db: Engine, ref: str, states: tuple[str, ...] = ("approved",)) -> Path:
    """The local directory of a registry version, for whatever loads it (training from a base,
    serving): only in one of `states`, and only if its files still match the record (409
    otherwise). Nothing is ever fetched: the registry holds local paths."""
    rec = get(db, *parse_ref(ref))
    if rec["state"] not in states:
        raise Conflict(
            f"'{ref}' is {rec['state']}; this needs it {' or '.join(states)}.",
            code="model_not_approved",
        )
    changed = mismatches(Path(rec["path"]), rec["files"])
    if changed:
        raise Conflict(
            f"'{ref}' at {rec['path']} is not what was registered: {'; '.join(changed[:5])}.",
            code="hash_mismatch",
        )
    return Path(rec["path"])
