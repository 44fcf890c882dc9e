"""`bastion models approve --run-gates`: before the gates are checked, run through the gateway
each gate's suite that the candidate (or the version in production, for `no_regression`) has
no finished run of. Each run is an ordinary `bastion eval run` (the same key, marker, usage and
audit), linked to its version the same way: through the alias that serves it now."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy import Engine

from bastion.core.errors import Conflict
from bastion.registry import gates, records


def run_missing(args: argparse.Namespace, settings: Any, db: Engine, rec: dict[str, Any]) -> int:
    """Runs the missing suites; returns how many were run (409 if one cannot be)."""
    from bastion.evals.cli import cmd_run

    done = 0
    applying = gates.applicable(settings, rec)  # evaluate() keeps this order
    for gate, ev in zip(applying, gates.evaluate(db, settings, rec), strict=True):
        for ref in ev.get("missing", []):
            target = records.get(db, *records.parse_ref(ref))
            alias = gates.alias_for(db, settings, target)
            if alias is None:
                raise Conflict(
                    f"--run-gates: no alias serves {ref} now, so gate {ev['gate']}'s suite "
                    f"cannot be run on it; {gates.run_command(settings, gate, target)}",
                    code="gate_failed",
                )
            sys.stderr.write(f"gate {ev['gate']}: running {gate.suite} on {ref} ({alias})\n")
            run = argparse.Namespace(
                suite=gate.suite, model=alias, adapter=ref, config=args.config, url=args.url,
                key=args.key, concurrency=args.concurrency, samples=1, temperature=None,
                max_tokens=None, resume=None, timeout=120.0,
            )  # fmt: skip
            if cmd_run(run) != 0:
                raise Conflict(
                    f"--run-gates: the run of {gate.suite} on {ref} did not finish (see above)",
                    code="gate_failed",
                )
            done += 1
    return done
