"""Promotion gates: the eval evidence a version needs before it may be approved.

`registry.gates` lists gates; each applies to the registry names (patterns), kinds and risk
tiers it names. For every gate that applies to the candidate:

1. its newest **finished** run of the gate's suite, as the suite file is now (same SHA-256), on
   the candidate (`eval_runs.registry_ref`, set by `bastion eval run --adapter REF` or by
   `--model ALIAS` when the alias's deployments declare `registry: REF`). None → blocked, with
   the command that produces it;
2. its mean on the metric against `min`/`max`;
3. with `no_regression`: the version in production is the newest other approved version of the
   same name (none → passes, "no version in production"); its newest run of the same suite text
   is compared with the candidate's case by case (`evals.compare.verdicts`, paired bootstrap at
   `level`): a `worse` verdict on the metric blocks.

`check()` is the one function the admin API, the CLI and the four-eyes executor call; it
returns the evidence (run ids, values, CI, verdicts) that goes into the history step and the
audit entry of the approval, or raises 409 `gate_failed` naming every failing gate, its suite,
metric, value and threshold or interval. Nothing is cached: runs may have changed between a
four-eyes request and its decision, so the executor checks again.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from sqlalchemy import Engine

from bastion.core.errors import Conflict
from bastion.registry import records
from bastion.registry.settings import GateSettings


def applicable(settings: Any, rec: dict[str, Any]) -> list[GateSettings]:
    """The gates `rec` must pass, in config order."""
    return [
        g
        for g in settings.registry.gates
        if any(fnmatch.fnmatchcase(rec["name"], p) for p in g.models)
        and (g.kinds is None or rec["kind"] in g.kinds)
        and (g.risk_tiers is None or rec["risk_tier"] in g.risk_tiers)
    ]


def production(db: Engine, rec: dict[str, Any]) -> dict[str, Any] | None:
    """The version in production: the newest approved version of the same name but `rec`."""
    approved = [r for r in records.listing(db, "approved", rec["name"]) if r["ref"] != rec["ref"]]
    return approved[-1] if approved else None  # listing is ordered by registration time


def alias_for(db: Engine, settings: Any, rec: dict[str, Any]) -> str | None:
    """The alias that serves `rec` now: an adapter's deployment, or a config alias whose
    deployments all declare it."""
    if rec["kind"] == "adapter":
        from bastion.evals.store import adapter_alias

        return adapter_alias(db, rec["ref"])
    for alias, model in settings.models.items():
        if model.deployments and all(d.registry == rec["ref"] for d in model.deployments):
            return str(alias)
    return None


def run_command(settings: Any, gate: GateSettings, rec: dict[str, Any]) -> str:
    """The exact command that produces the missing run."""
    if rec["kind"] == "adapter":
        return f"bastion eval run {gate.suite} --adapter {rec['ref']}"
    for alias, model in settings.models.items():
        if model.deployments and all(d.registry == rec["ref"] for d in model.deployments):
            return f"bastion eval run {gate.suite} --model {alias}"
    return (
        f"bastion eval run {gate.suite} --model ALIAS (an alias whose deployments all declare "
        f"`registry: {rec['ref']}`)"
    )


def candidate_value(db: Engine, run: dict[str, Any], metric: str) -> float | None:
    """The run's mean of `metric` over its cases (as `bastion eval show` prints it)."""
    from bastion.evals import compare, stats, store

    if metric == "cost":  # usage rows may have landed since the run ended
        store.attach_costs(db, run["id"])
    cases = compare.aggregate(store.results(db, run["id"]), sorted({1, run["samples"]}))
    vals = [c.metrics[metric] for c in cases.values() if metric in c.metrics]
    return stats.mean(vals) if vals else None


def _threshold(gate: GateSettings) -> tuple[str, float] | None:
    if gate.min is not None:
        return ">=", gate.min
    if gate.max is not None:
        return "<=", gate.max
    return None


def _one(db: Engine, settings: Any, gate: GateSettings, rec: dict[str, Any]) -> dict[str, Any]:
    """One gate's evidence; `failure` is set (a sentence) when it blocks."""
    from bastion.evals import store
    from bastion.evals.compare import verdicts
    from bastion.evals.suite import SuiteError, load_suite

    ev: dict[str, Any] = {"gate": gate.label, "suite": gate.suite, "metric": gate.metric}
    head = f"gate {gate.label} (suite {gate.suite}, metric {gate.metric})"
    try:
        suite, sha = load_suite(gate.suite)
    except (SuiteError, OSError) as exc:  # the file was removed or broken since config load
        return {**ev, "passed": False, "failure": f"{head}: the suite cannot be read: {exc}"}
    ev["suite_sha256"] = sha
    run = store.latest_run(db, rec["ref"], sha)
    if run is None:
        return {**ev, "passed": False, "missing": [rec["ref"]], "failure": (
            f"{head}: no finished run of suite {suite.name} as it is now (sha256 {sha[:12]}…) "
            f"on {rec['ref']}; produce it with `{run_command(settings, gate, rec)}`"
        )}  # fmt: skip
    ev["run"] = run["id"]
    value = candidate_value(db, run, gate.metric)
    if value is None or math.isnan(value):
        return {**ev, "passed": False,
                "failure": f"{head}: run {run['id']} has no value for {gate.metric}"}  # fmt: skip
    ev["value"] = value
    failures = []
    if (th := _threshold(gate)) is not None:
        op, bound = th
        ev["min" if op == ">=" else "max"] = bound
        if not (value >= bound if op == ">=" else value <= bound):
            failures.append(
                f"{gate.metric} = {value:.4g} on run {run['id']}, needs {op} {bound:.4g}"
            )
    if gate.no_regression:
        prod = production(db, rec)
        if prod is None:
            ev["regression"] = {"verdict": "no version in production"}
        elif (base := store.latest_run(db, prod["ref"], sha)) is None:
            ev["missing"] = [prod["ref"]]
            failures.append(
                f"no finished run of the same suite on the version in production "
                f"{prod['ref']} to compare with; produce it with "
                f"`{run_command(settings, gate, prod)}`"
            )
        else:
            try:
                m = verdicts(db, base["id"], run["id"], gate.level).get(gate.metric)
            except (LookupError, ValueError) as exc:
                m, why = None, str(exc)
            else:
                why = f"{gate.metric} is not in both runs"
            if m is None:
                failures.append(f"runs {base['id']} and {run['id']} cannot be compared: {why}")
            else:
                ev["regression"] = {
                    "production": prod["ref"], "run": base["id"], "value": m.mean_a,
                    "candidate_value": m.mean_b, "delta": m.delta, "ci": [m.low, m.high],
                    "level": m.level, "n": m.n, "verdict": m.verdict,
                }  # fmt: skip
                if m.verdict == "worse":
                    failures.append(
                        f"{gate.metric} regressed against {prod['ref']} (run {base['id']}): "
                        f"{m.mean_a:.4g} -> {m.mean_b:.4g}, delta {m.delta:+.4g}, "
                        f"{m.level:.0%} CI [{m.low:+.4g}, {m.high:+.4g}] excludes 0"
                    )
    ev["passed"] = not failures
    if failures:
        ev["failure"] = f"{head}: " + "; ".join(failures)
    return ev


def evaluate(db: Engine, settings: Any, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every applicable gate's evidence, passed or not (for display and for `check`)."""
    return [_one(db, settings, g, rec) for g in applicable(settings, rec)]


def check(db: Engine, settings: Any, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The gates' evidence if all pass ([] when none applies); 409 `gate_failed` otherwise."""
    found = evaluate(db, settings, rec)
    failed = [e["failure"] for e in found if not e["passed"]]
    if failed:
        raise Conflict(
            f"'{rec['ref']}' cannot be approved: {len(failed)} of {len(found)} promotion "
            f"gate(s) failed: " + " | ".join(failed),
            code="gate_failed",
        )
    return found
