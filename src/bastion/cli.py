"""`bastion` command line: serve, up, keys, teams, usage, report, db, config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from bastion import __version__
from bastion.config import ConfigError, Settings, load_settings
from bastion.core.errors import BastionError, DeploymentError


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _db(settings: Settings, write: bool = True):  # type: ignore[no-untyped-def]
    # write=False: a read-only command, which works with an account that can only read.
    from bastion.identity.teams import open_store

    return open_store(settings, write)


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- serve / up ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from bastion.observability.logs import configure_logging
    from bastion.workers import serve

    settings = _settings(args)
    configure_logging(settings.logging)  # uvicorn's loggers too (log_config=None)
    return serve(
        settings,
        host=args.host or settings.server.host,
        port=args.port or settings.server.port,
        log_level=args.log_level,
        workers=args.workers,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from bastion.local.quickstart import run_quickstart

    return run_quickstart(_settings(args))


# -- keys ---------------------------------------------------------------------------------------
def cmd_keys_create(args: argparse.Namespace) -> int:
    from bastion.audit.offline import cli_actor
    from bastion.core.timeutil import parse_duration
    from bastion.identity.keys import new_key
    from bastion.identity.teams import IdentityError

    settings = _settings(args)
    if args.role == "auditor":
        # Whoever holds the config and the database is no proof of anyone: auditors come from
        # the identity provider, or from two administrators through the admin API.
        return _fail(
            ValueError(
                "auditor keys are not made from the command line: map an IdP/directory group "
                "to role auditor (identity.group_mappings), or, with admin.four_eyes, ask "
                "through POST /admin/keys and have a second administrator approve"
            )
        )
    try:
        expires = parse_duration(args.expires) if args.expires else None
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        made = new_key(
            _db(settings),
            limits=_limit_flags(args),
            team=args.team,
            user=args.user,
            models=models,
            expires_in=expires,
            name=args.name or "",
            known_models={*settings.models, *settings.routers},
            role=args.role,
            created_by=cli_actor(),
        )
        pub = made.record.public()
        with _change(settings, "key.create", team=pub["team"], after=pub):
            made.save(_db(settings))
    except (IdentityError, ValueError, BastionError) as exc:
        return _fail(exc)
    sys.stderr.write(
        f"Created key {pub['id']} for team {pub['team']}"
        + (f", user {pub['user']}" if pub["user"] else "")
        + (f", expires {pub['expires_at']}" if pub["expires_at"] else "")
        + ".\nStore it now: it is shown only once.\n"
    )
    sys.stdout.write(made.token + "\n")
    return 0


def _change(settings: Settings, action: str, **fields: Any) -> Any:
    """The change is recorded on this host's CLI chain before it is made (core/changes.py)."""
    from bastion.audit.offline import cli_actor, cli_recorder
    from bastion.core.changes import recorded_change_sync

    db = _db(settings)
    return recorded_change_sync(cli_recorder(settings, db), cli_actor(), action, **fields)


def _fail(exc: Exception) -> int:
    message = exc.message if isinstance(exc, BastionError) else str(exc)
    sys.stderr.write(f"error: {message}\n")
    return 2


def _limit_flags(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from bastion.core.settings import LimitSettings

    return LimitSettings(
        rpm=args.rpm,
        tpm=args.tpm,
        concurrent=args.concurrent,
        budget_day=args.budget_day,
        budget_month=args.budget_month,
        currency=args.budget_currency,
    )


def cmd_keys_limits(args: argparse.Namespace) -> int:
    from bastion.identity.keys import get_key, set_key_limits
    from bastion.identity.teams import IdentityError

    settings = _settings(args)
    before = get_key(_db(settings), args.key_id)
    if before is None:
        return _fail(IdentityError(f"no key with id {args.key_id!r}"))
    try:
        limits = _limit_flags(args)
        after = {"limits": limits.model_dump(exclude_none=True) or None}
        with _change(settings, "key.limits", team=before.team, before=before.public(), after=after):
            rec = set_key_limits(_db(settings), args.key_id, limits)
    except (IdentityError, ValueError, BastionError) as exc:
        return _fail(exc)
    shown = rec.limits.model_dump(mode="json", exclude_none=True) if rec.limits else "the defaults"
    sys.stdout.write(f"{rec.id}: limits now {shown}\n")
    return 0


def _ask_gateway(args: argparse.Namespace, path: str, query: dict[str, str | None]) -> Any:
    """GET an admin endpoint of the running gateway with the admin key: its rows, or None
    (the error already told on stderr)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    settings = _settings(args)
    server = settings.server
    base = args.url or server.public_url or f"http://{server.host}:{server.port}"
    params = {k: v for k, v in query.items() if v}
    req = urllib.request.Request(
        base.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else ""),
        headers={"Authorization": f"Bearer {settings.admin.key or ''}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        sys.stderr.write(f"error: the gateway answered {exc.code}: {exc.read().decode()}\n")
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"error: cannot reach the gateway at {base}: {exc}\n")
    return None


def cmd_limits_status(args: argparse.Namespace) -> int:
    """Asks the running gateway: with the in-memory backend only it knows the counters."""
    from bastion.metering.reports import render

    rows = _ask_gateway(args, "/admin/limits", {"team": args.team})
    if rows is None:
        return 2
    if args.format == "json":
        _print_json(rows)
    else:
        sys.stdout.write(render(rows, args.format) if rows else "no limits configured\n")
    return 0


def cmd_routing_status(args: argparse.Namespace) -> int:
    """Asks the running gateway: routing state lives in its memory."""
    from bastion.metering.reports import render

    rows = _ask_gateway(args, "/admin/routing", {"model": args.model})
    if rows is None:
        return 2
    if args.format == "json":
        _print_json(rows)
        return 0
    for r in rows:
        r["decisions"] = " ".join(f"{k}={v}" for k, v in r["decisions"].items()) or "-"
        if "adapters" in r:
            r["adapters"] = " ".join(r["adapters"]) or "-"
    sys.stdout.write(render(rows, args.format) if rows else "no models configured\n")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from bastion.identity.keys import list_keys
    from bastion.metering.reports import render

    now = datetime.now(UTC)
    rows = [k.public(now) for k in list_keys(_db(_settings(args), write=False), args.team)]
    if args.format == "json":
        _print_json(rows)
        return 0
    for r in rows:
        r["models"] = ",".join(r["models"]) if r["models"] else "*"  # type: ignore[arg-type]
        for f in ("created_at", "expires_at", "revoked_at"):
            r[f] = (r[f] or "")[:19]  # type: ignore[index]
    sys.stdout.write(render(rows, args.format) if rows else "no keys\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from bastion.identity.keys import get_key, revoke_key
    from bastion.identity.teams import IdentityError

    settings = _settings(args)
    before = get_key(_db(settings), args.key_id)
    if before is None:
        return _fail(IdentityError(f"no key with id {args.key_id!r}"))
    try:
        # A revocation is never held back by the trail: recorded first if it can be.
        with _change(
            settings,
            "key.revoke",
            team=before.team,
            before=before.public(),
            takes_access_away=True,
        ):
            rec = revoke_key(_db(settings), args.key_id)
    except IdentityError as exc:
        return _fail(exc)
    sys.stdout.write(f"revoked {rec.id} ({rec.prefix}…, team {rec.team})\n")
    return 0


# -- teams, usage, db, config ---------------------------------------------------------------------
def cmd_teams_list(args: argparse.Namespace) -> int:
    from bastion.identity.teams import load_teams
    from bastion.metering.reports import render

    rows: list[dict[str, Any]] = [
        {
            "team": t.name,
            "cost_center": t.cost_center,
            "source": t.source,
            "models": ",".join(sorted(t.models)) if t.models is not None else "*",
        }
        for t in sorted(load_teams(_db(_settings(args), False)).values(), key=lambda t: t.name)
    ]
    sys.stdout.write(render(rows, "table") if rows else "no teams\n")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from bastion.core.timeutil import parse_time
    from bastion.metering.reports import render, summarize

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    rows = summarize(_db(_settings(args), write=False), args.by, since, until, args.team)
    sys.stdout.write(render(rows, args.format))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from bastion.config import _mask
    from bastion.store.db import upgrade_url

    settings = _settings(args)
    upgrade_url(settings.database.url)  # the explicit step, under a database-level lock
    _db(settings)  # the config's teams and cost centers, as before
    url = _mask(settings.database.url)  # never a password on screen or in a CI log
    sys.stdout.write(f"database is at the newest schema: {url}\n")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    s = _settings(args)
    deps = sum(len(m.deployments) for m in s.models.values())
    sys.stdout.write(
        f"config OK: {len(s.models)} model(s), {deps} deployment(s), "
        f"{len(s.teams)} team(s), {len(s.cost_centers)} cost center(s)\n"
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from bastion.config import redacted

    shown = redacted(_settings(args))
    if args.format == "json":
        _print_json(shown)
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True))
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from bastion.configdocs import render_config_reference

    sys.stdout.write(render_config_reference())
    return 0


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--concurrent", type=int, help="requests in flight at once")
    p.add_argument("--budget-day", type=_amount, help="spend per UTC day (exact decimal)")
    p.add_argument("--budget-month", type=_amount, help="spend per UTC month")
    p.add_argument("--budget-currency", help="ISO 4217 code of the budgets (metering.currency)")


def _amount(text: str) -> Decimal:
    """Money from the command line, exactly as written (never through a float)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from bastion.identity.roles import ROLE_HELP, ROLES

    p = argparse.ArgumentParser(
        prog="bastion", description="Operate your own LLMs behind one OpenAI-compatible endpoint."
    )
    p.add_argument("--version", action="version", version=f"bastion {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=None,
        help="config file (default: $BASTION_CONFIG, else ./bastion.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the gateway")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes on the one port, under a supervisor that restarts them "
        "(N > 1 needs limits.backend: redis; docs/deploy.md)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser(
        "up",
        parents=[common],
        help="start the engines marked `launch:` and the gateway (quickstart)",
    )
    s.set_defaults(func=cmd_up)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    s = keys.add_parser("create", parents=[common], help="create a key (printed once)")
    s.add_argument("--team", required=True)
    s.add_argument("--user")
    s.add_argument("--models", help="comma-separated aliases this key may use (default: all)")
    s.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    s.add_argument("--name", help="a label, e.g. the application using it")
    s.add_argument(
        "--role",
        choices=ROLES,
        default="member",
        help=ROLE_HELP + " (default: member)",
    )
    _add_limit_flags(s)
    s.set_defaults(func=cmd_keys_create)
    s = keys.add_parser(
        "limits", parents=[common], help="set a key's own limits (no flags: back to the defaults)"
    )
    s.add_argument("key_id")
    _add_limit_flags(s)
    s.set_defaults(func=cmd_keys_limits)
    s = keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    s.add_argument("--team")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_keys_list)
    s = keys.add_parser("revoke", parents=[common], help="revoke a key at once")
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_revoke)

    teams = sub.add_parser("teams", help="teams").add_subparsers(dest="teams_cmd", required=True)
    s = teams.add_parser("list", parents=[common])
    s.set_defaults(func=cmd_teams_list)

    lim = sub.add_parser("limits", help="rate limits and budgets").add_subparsers(
        dest="limits_cmd", required=True
    )
    s = lim.add_parser(
        "status", parents=[common], help="usage against every limit, from the running gateway"
    )
    s.add_argument("--team")
    s.add_argument("--url", help="gateway URL (default: from the config's server section)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_limits_status)

    rt = sub.add_parser("routing", help="how requests are spread over deployments")
    rts = rt.add_subparsers(dest="routing_cmd", required=True)
    s = rts.add_parser(
        "status", parents=[common], help="per deployment: decisions, load, cache hits (gateway)"
    )
    s.add_argument("--model")
    s.add_argument("--url", help="gateway URL (default: from the config's server section)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_routing_status)

    s = sub.add_parser("usage", parents=[common], help="usage and cost summaries")
    s.add_argument(
        "--by", choices=["team", "cost-center", "model", "day", "key", "user"], default="team"
    )
    s.add_argument("--since", help="e.g. 7d, 12h or 2026-11-01")
    s.add_argument("--until")
    s.add_argument("--team", help="only this team")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_usage)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_cmd", required=True)
    s = db.add_parser("upgrade", parents=[common], help="apply schema migrations")
    s.set_defaults(func=cmd_db_upgrade)

    from bastion.audit.cli import add_parser as add_audit_parser
    from bastion.evals.cli import add_commands as add_eval_commands
    from bastion.identity.cli import add_parsers as add_identity_parsers
    from bastion.metering.cli import add_commands as add_report_commands
    from bastion.plan.cli import add_commands as add_plan_commands
    from bastion.registry.cli import add_commands as add_registry_commands
    from bastion.tuning.cli import add_commands as add_tuning_commands

    add_identity_parsers(sub, keys, common)

    add_audit_parser(sub, common)
    add_tuning_commands(sub, common)
    add_registry_commands(sub, common)
    add_eval_commands(sub, common)
    add_report_commands(sub, common)
    add_plan_commands(sub, common)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(
        dest="cfg_cmd", required=True
    )
    s = cfg.add_parser("check", parents=[common], help="validate the config file")
    s.set_defaults(func=cmd_config_check)
    s = cfg.add_parser(
        "show", parents=[common], help="print the effective settings, secrets masked"
    )
    s.add_argument("--format", choices=["yaml", "json"], default="yaml")
    s.set_defaults(func=cmd_config_show)
    s = cfg.add_parser("docs", help="print the config reference (Markdown)")
    s.set_defaults(func=cmd_config_docs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("BASTION_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, DeploymentError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
