"""`bastion models deploy|undeploy|deployments`: adapters served under an alias, from the
command line, straight on the database; each change recorded first on this host's CLI audit
chain, as every `bastion models` change is. Running gateways pick the change up within
`registry.adapter_refresh_s`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bastion.core.errors import BastionError, NotFound
from bastion.registry import adapters


def cmd_deploy(args: argparse.Namespace) -> int:
    from bastion.audit.offline import cli_actor
    from bastion.registry.cli import _change, _ctx, _fail

    settings, db = _ctx(args)
    stage = "staging" if args.staging else "serve"
    try:
        row, replaced = adapters.deploy(db, settings, args.ref, args.to, stage)
        with _change(settings, db, "model.deploy", args.ref, before=replaced, after=row):
            done = adapters.write(db, row, cli_actor())
    except BastionError as exc:
        return _fail(exc)
    n = len(settings.models[done.base_alias].deployments)
    moved = f" (was {replaced['adapter']})" if replaced else ""
    sys.stdout.write(
        f"deployed {done.adapter} as {done.alias}{moved}, stage {done.stage}, on the "
        f"{n} deployment(s) of {done.base_alias}; gateways load it within "
        f"{settings.registry.adapter_refresh_s:g} s\n"
    )
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from bastion.registry.cli import _change, _ctx, _fail

    settings, db = _ctx(args)
    try:
        current = adapters.get(db, args.alias)
        if current is None:
            raise NotFound(f"No adapter is deployed as '{args.alias}'.")
        with _change(settings, db, "model.undeploy", current["adapter"], before=current,
                     reason=args.reason):  # fmt: skip
            adapters.undeploy(db, args.alias)
    except BastionError as exc:
        return _fail(exc)
    sys.stdout.write(f"undeployed {args.alias} ({current['adapter']})\n")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from bastion.metering.reports import render
    from bastion.registry.cli import _ctx

    _settings, db = _ctx(args)
    rows = adapters.listing(db)
    if args.format == "json":
        import orjson

        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(rows, "table") if rows else "no deployed adapters\n")
    return 0


def add_commands(m: Any, common: argparse.ArgumentParser) -> None:
    s = m.add_parser("deploy", parents=[common], help="serve an adapter under an alias")
    s.add_argument("ref", help="the adapter, NAME@VERSION")
    s.add_argument("--to", required=True, metavar="ALIAS", help="the name clients call")
    s.add_argument(
        "--staging",
        action="store_true",
        help="a validated (not yet approved) adapter, only for keys that name the alias",
    )
    s.set_defaults(func=cmd_deploy)
    s = m.add_parser("undeploy", parents=[common], help="stop serving an adapter alias")
    s.add_argument("alias")
    s.add_argument("--reason", required=True, help="recorded with the change")
    s.set_defaults(func=cmd_undeploy)
    s = m.add_parser("deployments", parents=[common], help="adapters served, by alias")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_deployments)
