"""`bastion report chargeback|tco|rebuild-rollups`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    rep = sub.add_parser("report", help="chargeback (FinOps FOCUS), cost case, rollups")
    reps = rep.add_subparsers(dest="report_cmd", required=True)

    s = reps.add_parser(
        "chargeback",
        parents=[common],
        help="a month as FOCUS rows: cost center x team x model x day, per currency",
    )
    s.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    s.add_argument("--format", choices=["csv", "json"], default="csv")
    s.add_argument("--out", help="write here (default: stdout)")
    s.set_defaults(func=cmd_chargeback)

    s = reps.add_parser(
        "tco", parents=[common], help="a month self-hosted against the vendor price list"
    )
    s.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_tco)

    s = reps.add_parser(
        "rebuild-rollups",
        parents=[common],
        help="recompute the hourly rollups from the usage records (default: all)",
    )
    s.add_argument("--since", help="e.g. 30d or 2026-11-01 (rounded down to the hour)")
    s.add_argument("--until", help="rounded up to the hour")
    s.set_defaults(func=cmd_rebuild)


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from bastion.config import load_settings
    from bastion.store.db import open_database

    settings = load_settings(args.config)
    return settings, open_database(settings.database.url, migrate=settings.database.migrates)


def _fail(msg: str) -> int:
    sys.stderr.write(f"error: {msg}\n")
    return 2


def cmd_chargeback(args: argparse.Namespace) -> int:
    from bastion.metering.chargeback import chargeback, render, totals

    settings, engine = _open(args)
    try:
        rows = chargeback(engine, args.month, settings.metering.currency)
    except ValueError as exc:
        return _fail(str(exc))
    text = render(rows, args.format)
    if args.out:
        Path(args.out).write_text(text)
        summary = ", ".join(f"{v} {c}" for c, v in totals(rows).items()) or "no usage"
        sys.stderr.write(f"{len(rows)} rows written to {args.out}: {summary}\n")
    else:
        sys.stdout.write(text)
    return 0


def cmd_tco(args: argparse.Namespace) -> int:
    from bastion.metering.reports import render
    from bastion.metering.tco import report

    settings, engine = _open(args)
    try:
        rows = report(engine, settings, args.month)
    except ValueError as exc:
        return _fail(str(exc))
    if args.format != "table":
        sys.stdout.write(render(rows, args.format))
        return 0
    # One block per model: the comparison has too many columns for one table row.
    for r in rows:
        sys.stdout.write(render([{"": k, r["model"]: v} for k, v in r.items()], "table") + "\n")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from bastion.core.timeutil import parse_time
    from bastion.metering.hourly import rebuild

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        return _fail(str(exc))
    _, engine = _open(args)
    n = rebuild(engine, since, until)
    sys.stdout.write(f"rebuilt {n} hourly rollup rows\n")
    return 0
