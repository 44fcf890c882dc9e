"""`bastion models register|list|show|verify|validate|approve|retire`: the registry from the command
line, straight on the database, each change recorded first on this host's CLI audit chain (as
`bastion keys` does). The actor is `user@host (cli)`.

With `registry.approval: four-eyes` the command line does not approve: whoever holds the config
and the database proves no second person. Approval then goes through the admin API, where a
signed-in administrator or the admin key's holder asks and another decides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bastion.config import load_settings
from bastion.core.errors import BastionError, Conflict
from bastion.registry import gates, records
from bastion.registry.cache import DigestCache
from bastion.registry.digests import DigestError, digest_dir, mismatches

#: Files at least this big get a progress line while they are hashed.
BIG = 256 * 1024 * 1024


class _Progress:
    """One stderr line per big file, redrawn at most every half second."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, label: str, done: int, size: int) -> None:
        if size < BIG:
            return
        now = time.monotonic()
        if done < size and now - self.last.get(label, 0.0) < 0.5:
            return
        self.last[label] = now
        end = "\n" if done >= size or not sys.stderr.isatty() else "\r"
        sys.stderr.write(f"hashing {label}: {done / 1e9:.2f}/{size / 1e9:.2f} GB "
                         f"({100 * done // max(size, 1)}%){end}")  # fmt: skip


def _ctx(args: argparse.Namespace) -> tuple[Any, Any]:
    from bastion.identity.teams import open_store

    settings = load_settings(args.config)
    return settings, open_store(settings)


def _change(settings: Any, db: Any, action: str, ref: str, **fields: Any) -> Any:
    from bastion.audit.offline import cli_actor, cli_recorder
    from bastion.core.changes import recorded_change_sync

    return recorded_change_sync(
        cli_recorder(settings, db), cli_actor(), action, model=ref, **fields
    )


def _fail(exc: Exception) -> int:
    sys.stderr.write(f"error: {exc.message if isinstance(exc, BastionError) else exc}\n")
    return 2


def cmd_register(args: argparse.Namespace) -> int:
    from bastion.audit.offline import cli_actor

    settings, db = _ctx(args)
    lineage: dict[str, Any] = {}
    try:
        if args.training_data:
            lineage["training_data_sha256"] = args.training_data
        if args.hyperparameters:
            lineage["hyperparameters"] = orjson.loads(args.hyperparameters)
        path = Path(args.path)
        started = time.monotonic()
        files = digest_dir(path, _Progress(), cache=DigestCache(db, reuse=False))
        took = time.monotonic() - started
        row = records.new_record(
            db, path, files, name=args.name, version=args.version, kind=args.kind,
            created_by=cli_actor(), base=args.base, license=args.license, owner=args.owner,
            intended_use=args.intended_use, risk_tier=args.risk_tier, lineage=lineage,
        )  # fmt: skip
        after = {k: row[k] for k in ("kind", "path", "manifest_sha256", "base", "owner")}
        with _change(settings, db, "model.register", f"{args.name}@{args.version}", after=after):
            rec = records.insert(db, row)
    except (BastionError, DigestError, ValueError) as exc:
        return _fail(exc)
    size = sum(f["size"] for f in rec["files"])
    sys.stdout.write(
        f"registered {rec['ref']} ({rec['kind']}, draft): {len(rec['files'])} files, "
        f"{size / 1e6:.1f} MB hashed in {took:.1f} s, manifest sha256 {rec['manifest_sha256']}\n"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bastion.metering.reports import render

    _settings, db = _ctx(args)
    rows = records.listing(db, args.state, args.name)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    table = [
        {"model": r["ref"], "kind": r["kind"], "state": r["state"], "owner": r["owner"] or "",
         "risk_tier": r["risk_tier"] or "", "manifest": r["manifest_sha256"][:16],
         "base": r["base"] or ""}
        for r in rows
    ]  # fmt: skip
    sys.stdout.write(render(table, "table") if table else "no registered models\n")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _settings, db = _ctx(args)
    try:
        rec = records.get(db, *records.parse_ref(args.ref))
    except BastionError as exc:
        return _fail(exc)
    sys.stdout.write(orjson.dumps(rec, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _move(args: argparse.Namespace, verb: str, evidence: str) -> int:
    from bastion.audit.offline import cli_actor

    settings, db = _ctx(args)
    try:
        rec = records.get(db, *records.parse_ref(args.ref))
        to = records.check_transition(db, rec, verb)
        if verb == "approve" and settings.registry.approval == "four-eyes":
            raise Conflict(
                "registry.approval is four-eyes: approvals go through the admin API "
                f"(POST /admin/models/{rec['name']}/{rec['version']}/approve, then a second "
                "person at /admin/approvals/{id}/approve), not the command line.",
                code="four_eyes",
            )
        if verb == "validate":
            changed = mismatches(
                Path(rec["path"]), rec["files"], _Progress(), cache=DigestCache(db, reuse=False)
            )
            if changed:
                raise Conflict(
                    f"{rec['ref']} cannot be validated: its files at {rec['path']} changed "
                    f"since registration: {'; '.join(changed[:5])}",
                    code="hash_mismatch",
                )
        extra: dict[str, Any] = {}
        if verb == "approve" and getattr(args, "run_gates", False):
            from bastion.registry.gate_runs import run_missing

            run_missing(args, settings, db, rec)
        if verb == "approve" and (passed := gates.check(db, settings, rec)):
            extra["gates"] = passed
        with _change(settings, db, f"model.{verb}", rec["ref"], before={"state": rec["state"]},
                     after={"state": to}, evidence=evidence, **extra):  # fmt: skip
            done = records.transition(db, rec, to, cli_actor(), evidence, **extra)
    except BastionError as exc:
        return _fail(exc)
    for g in extra.get("gates", []):
        sys.stdout.write(f"gate {g['gate']}: passed ({_gate_line(g)})\n")
    sys.stdout.write(f"{done['ref']}: {rec['state']} -> {done['state']}\n")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    """Where a version stands on its promotion gates now; exit 1 if approving would be blocked."""
    settings, db = _ctx(args)
    try:
        found = gates.evaluate(db, settings, records.get(db, *records.parse_ref(args.ref)))
    except BastionError as exc:
        return _fail(exc)
    if not found:
        sys.stdout.write(f"no promotion gate applies to {args.ref}\n")
    for g in found:
        line = f"passed ({_gate_line(g)})" if g["passed"] else f"BLOCKED: {g['failure']}"
        sys.stdout.write(f"gate {g['gate']}: {line}\n")
    return 0 if all(g["passed"] for g in found) else 1


def _gate_line(g: dict[str, Any]) -> str:
    """`pass = 0.95 on ev_…, >= 0.8; no regression vs x@1: +0.02 [-0.03, +0.07]`."""
    out = f"{g['metric']} = {g['value']:.4g} on {g['run']}"
    for key, op in (("min", ">="), ("max", "<=")):
        if key in g:
            out += f", {op} {g[key]:.4g}"
    reg = g.get("regression")
    if reg and "ci" in reg:
        lo, hi = reg["ci"]
        out += (f"; against {reg['production']} ({reg['run']}): {reg['delta']:+.4g} "
                f"[{lo:+.4g}, {hi:+.4g}], {reg['verdict']}")  # fmt: skip
    elif reg:
        out += f"; {reg['verdict']}"
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    return _move(args, "validate", args.evidence)


def cmd_approve(args: argparse.Namespace) -> int:
    return _move(args, "approve", args.evidence)


def cmd_retire(args: argparse.Namespace) -> int:
    return _move(args, "retire", args.reason)


def cmd_verify(args: argparse.Namespace) -> int:
    """Hashes a directory (default: where the version was registered) against the record:
    what an operator runs before pointing a deployment's `model_path` at a copy."""
    _settings, db = _ctx(args)
    try:
        rec = records.get(db, *records.parse_ref(args.ref))
    except BastionError as exc:
        return _fail(exc)
    path = Path(args.path or rec["path"])
    changed = mismatches(path, rec["files"], _Progress())
    for line in changed:
        sys.stdout.write(line + "\n")
    if changed:
        sys.stderr.write(f"error: {path} is not {rec['ref']} as registered\n")
        return 1
    sys.stdout.write(f"{path} matches {rec['ref']} ({len(rec['files'])} files; {rec['state']})\n")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser("models", help="the model registry: inventory, digests, approvals")
    m = models.add_subparsers(dest="models_cmd", required=True)
    s = m.add_parser("register", parents=[common], help="hash a model directory, record a draft")
    s.add_argument("path", help="the model or adapter directory")
    s.add_argument("--name", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--kind", choices=["base", "adapter"], default="base")
    s.add_argument("--base", help="an adapter's base model, NAME@VERSION")
    s.add_argument("--license")
    s.add_argument("--owner", help="the accountable owner (a person or team)")
    s.add_argument("--intended-use")
    s.add_argument("--risk-tier", choices=records.RISK_TIERS)
    s.add_argument("--training-data", help="an adapter's training data manifest sha256")
    s.add_argument("--hyperparameters", help="an adapter's training hyperparameters (JSON)")
    s.set_defaults(func=cmd_register)
    s = m.add_parser("list", parents=[common], help="the inventory")
    s.add_argument("--state", choices=records.STATES)
    s.add_argument("--name")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_list)
    s = m.add_parser("show", parents=[common], help="one version's record, files and history")
    s.add_argument("ref", help="NAME@VERSION")
    s.set_defaults(func=cmd_show)
    s = m.add_parser("gates", parents=[common], help="check the promotion gates (no approval)")
    s.add_argument("ref", help="NAME@VERSION")
    s.set_defaults(func=cmd_gates)
    s = m.add_parser("verify", parents=[common], help="check a directory against a record")
    s.add_argument("ref", help="NAME@VERSION")
    s.add_argument("--path", help="the directory (default: where it was registered from)")
    s.set_defaults(func=cmd_verify)
    for verb, func, what, flag in (
        ("validate", cmd_validate, "draft -> validated (files re-hashed)", "--evidence"),
        ("approve", cmd_approve, "validated -> approved", "--evidence"),
        ("retire", cmd_retire, "-> retired (final)", "--reason"),
    ):
        s = m.add_parser(verb, parents=[common], help=what)
        s.add_argument("ref", help="NAME@VERSION")
        s.add_argument(flag, required=True, help="recorded with the transition")
        s.set_defaults(func=func)
        if verb == "approve":
            s.add_argument(
                "--run-gates",
                action="store_true",
                help="first run, through the gateway, the gates' suites that have no run yet",
            )
            s.add_argument("--url", help="gateway URL for --run-gates (default: from the config)")
            s.add_argument("--key", help="API key for --run-gates (default: $BASTION_EVAL_KEY)")
            s.add_argument("--concurrency", type=int, default=4, help="for --run-gates")
    from bastion.registry.deploy_cli import add_commands as add_deploy_commands

    add_deploy_commands(m, common)
