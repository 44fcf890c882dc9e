"""`bastion audit …`: verify, search, show, export, hold, release, shred, purge, ship.

Reading contents (search, show, export) goes through the running gateway with an auditor key
(`--key` or $BASTION_AUDIT_KEY), so the read is checked and recorded like any other.
Verification reads hashes and signatures only, straight from the store or an export file.
Placing holds, purging and key rotation act on the store directly and are recorded on the
CLI's chain. Lifting a hold and shredding need a second administrator, so they go through the
admin API's four-eyes approvals; the commands say how.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bastion.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _db(settings: Settings, write: bool = True):  # type: ignore[no-untyped-def]
    from bastion.identity.teams import open_store

    return open_store(settings, write)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


# -- verify ---------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from bastion.audit.anchor import AnchorError
    from bastion.audit.verify import trusted_keys, verify_file, verify_store
    from bastion.core.timeutil import parse_time

    settings = _settings(args)
    a = settings.audit
    trust = trusted_keys(a, *(args.public_key or []))
    if not trust:
        return _fail("no trusted public key: pass --public-key or set audit.trusted_public_keys")
    anchor = args.anchor or a.anchor_dir
    try:
        if args.file:
            verdict = verify_file(Path(args.file), trust)
        else:
            since = parse_time(args.since) if args.since else None
            verdict = verify_store(
                _db(settings, write=False),  # an auditor's read-only account is enough
                trust,
                since,
                anchor_dir=None if args.no_anchor or not anchor else Path(anchor),
                max_unsigned_seconds=a.max_unsigned_seconds,
            )
    except AnchorError as exc:
        sys.stdout.write(f"BROKEN: {exc}\n")
        return 1
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        sys.stdout.write(orjson.dumps(vars(verdict)).decode() + "\n")
    elif verdict.ok:
        sys.stdout.write(
            f"OK: {verdict.entries} entries in {verdict.replicas} chain(s), "
            f"{verdict.checkpoints} signed checkpoint(s) verified"
            + (f"; {verdict.unsigned} newest entries not yet signed" if verdict.unsigned else "")
            + (
                f"; {verdict.anchored_heads} anchored head(s) present"
                if verdict.anchored_heads
                else ""
            )
            + (
                f"; {verdict.unbound_plaintexts} plaintext(s) from before commitments, not bound"
                if verdict.unbound_plaintexts
                else ""
            )
            + "\n"
        )
    else:
        sys.stdout.write(
            f"BROKEN: chain {verdict.replica} at seq {verdict.seq}: {verdict.reason}\n"
        )
    return 0 if verdict.ok else 1


# -- reads through the gateway ---------------------------------------------------------------
def _get(args: argparse.Namespace, path: str, params: dict[str, Any]) -> bytes:
    settings = _settings(args)
    key = args.key or os.environ.get("BASTION_AUDIT_KEY")
    if not key:
        raise ValueError("an auditor key is needed: --key or $BASTION_AUDIT_KEY")
    base = (
        args.url
        or settings.server.public_url
        or (f"http://{settings.server.host}:{settings.server.port}")
    )
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    req = urllib.request.Request(
        base.rstrip("/") + path + (f"?{query}" if query else ""),
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.read()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        detail = orjson.loads(exc.read() or b"{}").get("error", {}).get("message", "")
        raise ValueError(f"the gateway answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot reach the gateway at {base}: {exc}") from None


def _reading(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ValueError as exc:
            return _fail(str(exc))

    return run


@_reading
def cmd_search(args: argparse.Namespace) -> int:
    params = {
        "since": args.since, "until": args.until, "team": args.team, "user": args.user,
        "key_id": args.key_id, "model": args.model, "status": args.status, "kind": args.kind,
        "q": args.text, "limit": args.limit,
    }  # fmt: skip
    result = orjson.loads(_get(args, "/audit/entries", params))
    if args.format == "json":
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for e in result["data"]:
        sys.stdout.write(
            f"{e['ts']}  {e['replica']}#{e['seq']}  {e.get('kind', ''):10} "
            f"{e.get('request_id') or '-':28} {e.get('team') or '-':12} "
            f"{e.get('user') or '-':16} {e.get('model') or '-':12} {e.get('status') or ''}\n"
        )
    return 0


@_reading
def cmd_show(args: argparse.Namespace) -> int:
    body = _get(args, f"/audit/requests/{urllib.parse.quote(args.request_id)}", {})
    sys.stdout.write(orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


@_reading
def cmd_export(args: argparse.Namespace) -> int:
    body = _get(
        args, "/audit/export", {"since": args.since, "until": args.until, "team": args.team}
    )
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        lines = body.count(b"\n")
        sys.stderr.write(f"wrote {lines} lines to {args.output}\n")
    else:
        sys.stdout.buffer.write(body)
    return 0


# -- administration (straight on the store, recorded on the CLI's chain) --------------------
def _admin(
    action: str,
    fn: Callable[[Any, argparse.Namespace], Any],
    plan: Callable[[Settings, Any, argparse.Namespace], dict[str, Any]] | None = None,
) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        from bastion.audit.keys import KeyOperationError
        from bastion.audit.offline import cli_actor, cli_recorder
        from bastion.audit.store import AuditStoreError
        from bastion.core.changes import recorded_change_sync
        from bastion.core.errors import AuditUnavailable

        settings = _settings(args)
        db = _db(settings)
        fields = {"team": getattr(args, "team", None)}
        if getattr(args, "reason", None):
            fields["after"] = {"reason": args.reason}
        if plan is not None:
            fields.update(plan(settings, db, args))
        try:
            with recorded_change_sync(cli_recorder(settings, db), cli_actor(), action, **fields):
                out = fn(db, args)
        except (AuditStoreError, KeyOperationError) as exc:
            return _fail(str(exc))
        except AuditUnavailable as exc:
            return _fail(exc.message)
        sys.stdout.write(orjson.dumps(out).decode() + "\n")
        return 0

    return run


def _needs_two(args: argparse.Namespace) -> int:
    """Lifting a hold and shredding are never one person's doing, and holding the config and
    the database proves nobody's identity: the admin API asks, a second administrator approves."""
    how = {
        "release": f"DELETE /admin/audit/holds/{args.team}",
        "shred": 'POST /admin/audit/shred {"team": "' + args.team + '"}',
    }[args.two_admins]
    return _fail(
        f"`bastion audit {args.two_admins}` needs a second administrator: ask with {how}, then "
        "another administrator approves with POST /admin/approvals/{id}/approve"
    )


def _rotate_team(db: Any, args: argparse.Namespace) -> Any:
    from bastion.audit.keys import load_master_key
    from bastion.audit.store import rotate_team_key

    wrapper = load_master_key(_settings(args).audit, create=False)
    return {"team": args.team, "key": rotate_team_key(db, args.team, wrapper)}


def _rotate(db: Any, args: argparse.Namespace) -> Any:
    from bastion.audit.keys import rotate_master_key

    settings = _settings(args)
    wait = settings.identity.key_refresh_seconds + 1
    return rotate_master_key(settings.audit, db, settle_seconds=wait)


def _hold(db: Any, args: argparse.Namespace) -> Any:
    from bastion.audit.offline import cli_actor
    from bastion.audit.store import place_hold

    return {"team": args.team, "placed": place_hold(db, args.team, args.reason, cli_actor())}


def _purge(db: Any, args: argparse.Namespace) -> Any:
    from bastion.audit.store import purge

    return {"purged": purge(db, args.cutoffs)}


def _purge_plan(settings: Settings, db: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The cutoffs go into the purge's entry before anything is dropped (see verify)."""
    from bastion.audit.api import retention_map
    from bastion.audit.store import purge_cutoffs

    args.cutoffs = purge_cutoffs(db, retention_map(settings))
    return {"after": {"cutoffs": args.cutoffs}}


def cmd_holds(args: argparse.Namespace) -> int:
    from bastion.audit.store import holds

    sys.stdout.write(orjson.dumps(holds(_db(_settings(args), write=False))).decode() + "\n")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    """Ships what stopped replicas left in the log directory (a running one ships its own)."""
    from bastion.audit.keys import load_master_key, load_signing_key
    from bastion.audit.shipper import Shipper
    from bastion.audit.wal import AuditLog, AuditLogError, segments

    settings = _settings(args)
    db = _db(settings)
    directory = Path(settings.audit.wal_dir)
    replicas = sorted({p.name.rsplit("-", 1)[0] for p in segments(directory)})
    total = 0
    # Never made here: a key this host invented would sign checkpoints nobody trusts.
    try:
        master = load_master_key(settings.audit, create=False)
        key, _created = load_signing_key(settings.audit, master, create=False)
    except (OSError, ValueError) as exc:
        return _fail(f"the audit keys the gateways use are needed here: {exc}")
    for replica in replicas:
        try:  # holding the replica's lock proves no gateway is writing it
            wal = AuditLog(directory, replica, signing_key=key)
        except AuditLogError:
            sys.stderr.write(f"{replica}: in use by a running process, skipped\n")
            continue
        try:
            wal.sign_head()  # its tail, unsigned since a crash, must not stay so
            position = wal.durable  # idle: nothing is written while we hold its lock
            total += Shipper(db, directory, replica, lambda p=position: p).ship_once()
        finally:
            wal.close()
    sys.stdout.write(f"shipped {total} entries from {len(replicas)} replica(s)\n")
    return 0


def cmd_secrets_init(args: argparse.Namespace) -> int:
    """Once per deployment: the keys every replica and CLI host must share (docs/deploy.md)."""
    from bastion.audit.keys import SECRET_FILES, KeyOperationError, init_secrets

    directory = Path(args.dir)
    try:
        public = init_secrets(directory)
    except KeyOperationError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {', '.join(SECRET_FILES)} to {directory} (mode 0600)\n")
    sys.stdout.write("mount them on every replica and CLI host and point the settings there:\n")
    for name, setting in SECRET_FILES.items():
        sys.stdout.write(f"  {setting}: <mount>/{name}\n")
    sys.stdout.write(f"  audit.trusted_public_keys: [{public}]\n")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("secrets", help="keys shared by every replica").add_subparsers(
        dest="secrets_cmd", required=True
    )
    s = s.add_parser("init", help="write a new set of shared keys (master, signing, session)")
    s.add_argument("--dir", required=True, help="an empty folder (e.g. for a Kubernetes Secret)")
    s.set_defaults(func=cmd_secrets_init)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_cmd", required=True
    )
    s = audit.add_parser("verify", parents=[common], help="check every hash and signature")
    s.add_argument("--since", help="verify from this time on (e.g. 7d, 2026-11-01)")
    s.add_argument("--file", help="verify an export file instead of the store")
    s.add_argument("--public-key", action="append", help="trust this public key (hex)")
    s.add_argument("--anchor", help="the anchor directory (default: audit.anchor_dir)")
    s.add_argument("--no-anchor", action="store_true", help="do not check the anchor")
    s.add_argument("--format", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_verify)

    reading = argparse.ArgumentParser(add_help=False, parents=[common])
    reading.add_argument("--url", help="gateway URL (default: from the config)")
    reading.add_argument("--key", help="auditor key (default: $BASTION_AUDIT_KEY)")
    s = audit.add_parser("search", parents=[reading], help="find entries (auditor key)")
    for flag in ("--since", "--until", "--team", "--user", "--key-id", "--model", "--kind"):
        s.add_argument(flag)
    s.add_argument("--status", type=int)
    s.add_argument("--text", help="text to find in the decrypted prompts and answers")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_search)
    s = audit.add_parser("show", parents=[reading], help="one request, decrypted (auditor key)")
    s.add_argument("request_id")
    s.set_defaults(func=cmd_show)
    s = audit.add_parser("export", parents=[reading], help="JSON lines, verifiable offline")
    s.add_argument("--since")
    s.add_argument("--until")
    s.add_argument("--team", help="decrypt only this team's contents")
    s.add_argument("--output", "-o", help="file to write (mode 0600); default stdout")
    s.set_defaults(func=cmd_export)

    s = audit.add_parser("hold", parents=[common], help="legal hold: shred and purge refuse")
    s.add_argument("--team", required=True)
    s.add_argument("--reason", required=True)
    s.set_defaults(func=_admin("audit.hold", _hold))
    s = audit.add_parser("release", parents=[common], help="lift a legal hold (two admins)")
    s.add_argument("--team", required=True)
    s.set_defaults(func=_needs_two, two_admins="release")
    s = audit.add_parser("holds", parents=[common], help="list legal holds")
    s.set_defaults(func=cmd_holds)
    s = audit.add_parser(
        "shred", parents=[common], help="destroy a team's content keys (two admins)"
    )
    s.add_argument("--team", required=True)
    s.set_defaults(func=_needs_two, two_admins="shred")
    s = audit.add_parser("purge", parents=[common], help="drop contents past retention")
    s.set_defaults(func=_admin("audit.purge", _purge, _purge_plan))
    s = audit.add_parser(
        "rotate-master-key",
        parents=[common],
        help="re-wrap every data key and the signing key under a fresh master key",
    )
    s.set_defaults(func=_admin("audit.rotate_master_key", _rotate))
    s = audit.add_parser(
        "rotate-team-key", parents=[common], help="a fresh data key for a team's new contents"
    )
    s.add_argument("--team", required=True)
    s.set_defaults(func=_admin("audit.rotate_team_key", _rotate_team))
    s = audit.add_parser("ship", parents=[common], help="ship stopped replicas' logs")
    s.set_defaults(func=cmd_ship)
