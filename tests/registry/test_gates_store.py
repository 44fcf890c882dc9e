"""Gates without the HTTP layer, on SQLite and PostgreSQL: which gates apply, what counts as
the candidate's run (the suite as it is now), the version in production and its run, and how
`eval run` resolves what registry version an alias serves. Plus the settings' validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bastion.config import ConfigError, parse_settings
from bastion.evals.cli import _target
from bastion.registry import gates, records
from bastion.registry.digests import digest_dir
from bastion.store.db import open_database
from bastion.store.schema import adapter_deployments
from tests.registry.gate_helpers import first_n, stored_run, suite_file
from tests.registry.helpers import DOCUMENTED


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "postgres":
        return open_database(request.getfixturevalue("pg_url"))
    return open_database(f"sqlite:///{tmp_path / 'g.db'}")


def _settings(*gate_list: dict[str, Any], models: dict[str, Any] | None = None) -> Any:
    return parse_settings({"registry": {"gates": list(gate_list)}, "models": models or {}})


def _alias(ref: str | None) -> dict[str, Any]:
    """A config model alias (no engine behind it: nothing here calls it)."""
    dep = {"url": "http://127.0.0.1:9", "served_name": "t"}
    return {"deployments": [{**dep, "registry": ref} if ref else dep]}


def _record(db: Engine, model: Path, ref: str, state: str, **extra: Any) -> dict[str, Any]:
    name, version = records.parse_ref(ref)
    kind = "adapter" if "base" in extra else "base"
    fields = {**DOCUMENTED, **extra}
    row = records.new_record(db, model, digest_dir(model), name=name, version=version,
                             kind=kind, created_by="t", **fields)  # fmt: skip
    rec = records.insert(db, row)
    for to in ("validated", "approved")[: ("draft", "validated", "approved").index(state)]:
        rec = records.transition(db, rec, to, "t", "e")
    return rec


def test_which_gates_apply(tmp_path: Path) -> None:
    suite = suite_file(tmp_path)
    s = _settings(
        {"suite": str(suite), "min": 0.5, "name": "all"},
        {"suite": str(suite), "min": 0.5, "name": "legal", "models": ["legal", "tiny-*"],
         "kinds": ["adapter"]},
        {"suite": "banking-faq", "no_regression": True, "name": "risky",
         "risk_tiers": ["high", "critical"]},
    )  # fmt: skip
    rec = {"name": "tiny-legal", "kind": "adapter", "risk_tier": "low"}
    assert [g.label for g in gates.applicable(s, rec)] == ["all", "legal"]
    rec = {"name": "other", "kind": "adapter", "risk_tier": "high"}
    assert [g.label for g in gates.applicable(s, rec)] == ["all", "risky"]
    assert s.registry.gates[2].suite == "banking-faq"  # a shipped suite stays a name
    assert s.registry.gates[0].suite == str(suite.resolve())


@pytest.mark.parametrize(
    ("gate", "error"),
    [
        ({"suite": "no-such-suite", "min": 0.5}, "suite 'no-such-suite' cannot be used"),
        ({"suite": "banking-faq", "metric": "score:judge", "min": 0.5},
         "suite 'banking-faq' has no scorer 'judge' (it has: contains, latency)"),
        ({"suite": "banking-faq", "metric": "latency_ms", "min": 5}, "give `max`, not `min`"),
        ({"suite": "banking-faq", "max": 0.5}, "pass is higher-better: give `min`, not `max`"),
        ({"suite": "banking-faq"}, "a gate needs `min`/`max`, `no_regression: true`, or both"),
        ({"suite": "banking-faq", "metric": "accuracy", "min": 1}, "metric 'accuracy': one of"),
        ({"suite": "banking-faq", "min": 1, "level": 1.5}, "registry.gates[0].level"),
    ],
)  # fmt: skip
def test_bad_gates_are_config_errors(gate: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(gate)
    assert "registry.gates[0]" in str(info.value) and error in str(info.value), str(info.value)


def test_the_evidence_a_gate_takes(db: Engine, tiny_model: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path)
    gate = {"suite": str(suite), "metric": "score:contains", "min": 0.6, "no_regression": True}
    s = _settings(gate, models={"tiny": _alias("m@1")})
    served = _record(db, tiny_model, "m@1", "approved")
    # Registered later, so production: the newest approved registration, whatever its version.
    _record(db, tiny_model, "m@0", "approved")
    cand = _record(db, tiny_model, "m@2", "validated")
    assert gates.production(db, cand)["ref"] == "m@0"  # type: ignore[index]
    cand_run = stored_run(db, suite, "m@2", first_n(40))
    # Production has no run of this suite: blocked, with the command for production's alias.
    (ev,) = gates.evaluate(db, s, cand)
    assert not ev["passed"] and ev["run"] == cand_run and ev["value"] == 1.0
    assert "no finished run of the same suite on the version in production m@0" in ev["failure"]
    assert f"`bastion eval run {suite.resolve()} --model ALIAS" in ev["failure"]
    assert gates.run_command(s, s.registry.gates[0], served) == (
        f"bastion eval run {suite.resolve()} --model tiny"
    )
    base_run = stored_run(db, suite, "m@0", first_n(40))
    assert gates.check(db, s, cand)[0]["regression"]["run"] == base_run
    # The suite file is edited: runs of the old text no longer count, on either side.
    suite_file(tmp_path, cases=41)
    (ev,) = gates.evaluate(db, s, cand)
    assert "no finished run of suite facts as it is now" in ev["failure"]
    assert "`bastion eval run" in ev["failure"] and "run" not in ev
    new_cand = stored_run(db, suite, "m@2", first_n(41))
    (ev,) = gates.evaluate(db, s, cand)
    assert ev["run"] == new_cand and "the version in production m@0" in ev["failure"]
    # An adapter's missing run names --adapter.
    adapter = _record(db, tiny_model, "m-legal@1", "validated", base="m@1")
    (ev,) = gates.evaluate(db, s, adapter)
    assert f"`bastion eval run {suite.resolve()} --adapter m-legal@1`" in ev["failure"]


def test_eval_run_finds_the_version_an_alias_serves(db: Engine, tiny_model: Path) -> None:
    from datetime import UTC, datetime

    serving = {"tiny": _alias("m@1"), "plain": _alias(None)}
    s = _settings(models=serving)
    assert _target(db, s, "tiny", None) == ("tiny", "m@1")
    assert _target(db, s, "plain", None) == ("plain", None)
    assert _target(db, s, None, None) == (
        "--model ALIAS or --adapter NAME@VERSION is required (what to evaluate)"
    )
    assert _target(db, s, None, "bad") == "--adapter 'bad': expected NAME@VERSION, e.g. legal@2"
    assert _target(db, s, None, "legal@1") == (
        "adapter legal@1 is not deployed: deploy it for evaluation with "
        "`bastion models deploy legal@1 --to ALIAS --staging`, then run again"
    )
    with db.begin() as conn:
        for alias, stage in (("a-staging", "staging"), ("b-serve", "serve")):
            conn.execute(adapter_deployments.insert(), {
                "alias": alias, "adapter": "legal@1", "base_alias": "tiny", "stage": stage,
                "created_by": "t", "created_at": datetime.now(UTC)})  # fmt: skip
    assert _target(db, s, None, "legal@1") == ("b-serve", "legal@1")
    assert _target(db, s, "a-staging", "legal@1") == ("a-staging", "legal@1")
    assert _target(db, s, "a-staging", None) == ("a-staging", "legal@1")
    # Claiming an alias serves a version it does not is refused, not recorded.
    assert _target(db, s, "tiny", "legal@1") == "alias 'tiny' serves m@1, not legal@1"
    assert _target(db, s, "plain", "legal@1") == (
        "alias 'plain' serves no registry version, not legal@1"
    )
