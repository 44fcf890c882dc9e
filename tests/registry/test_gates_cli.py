"""Gates on the command line (`bastion` processes on a real config and database):
`models gates` says where a version stands, `models approve` is blocked naming the metric,
passes with the evidence printed, recorded on the CLI audit chain and shown by `models show`;
`eval run --adapter` refuses an adapter that is not deployed before any call, and `eval show`
names the version a run evaluated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson

from bastion.store.db import open_database
from tests.conftest import Gateway, base_config
from tests.registry.gate_helpers import first_n, stored_run, suite_file
from tests.registry.helpers import DOCUMENTED, admin_trail

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


def test_models_approve_runs_the_gates(
    make_gateway: Callable[..., Gateway], tiny_model: Path, tmp_path: Path
) -> None:
    suite = suite_file(tmp_path)
    url = f"sqlite:///{tmp_path}/b.db"
    gate = {"name": "facts", "models": ["tiny-chat"], "suite": str(suite), "min": 0.9}
    gw = make_gateway(base_config(url, {}, registry={"gates": [gate]}), start=False)
    gw.cli("models", "register", str(tiny_model), "--name", "tiny-chat", "--version", "1",
           *FLAGS)  # fmt: skip
    gw.cli("models", "validate", "tiny-chat@1", "--evidence", "eval")
    bad = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC", check=False)
    assert bad.returncode == 2 and "gate facts (suite" in bad.stderr, bad.stderr
    assert f"`bastion eval run {suite} --model ALIAS" in bad.stderr
    db = open_database(url)
    low = stored_run(db, suite, "tiny-chat@1", first_n(30))
    bad = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC", check=False)
    assert bad.returncode == 2
    assert f"1 of 1 promotion gate(s) failed: gate facts (suite {suite}, metric pass): " \
           f"pass = 0.75 on run {low}, needs >= 0.9" in bad.stderr, bad.stderr  # fmt: skip
    shown = gw.cli("eval", "show", low).stdout
    assert f"run {low}: suite facts v1 on tiny:cand (tiny-chat@1), finished" in shown
    dry = gw.cli("models", "gates", "tiny-chat@1", check=False)
    assert dry.returncode == 1 and dry.stdout.startswith("gate facts: BLOCKED: gate facts (")
    good = stored_run(db, suite, "tiny-chat@1", first_n(40))
    db.dispose()
    dry = gw.cli("models", "gates", "tiny-chat@1")
    assert dry.stdout == f"gate facts: passed (pass = 1 on {good}, >= 0.9)\n"
    ok = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC")
    assert ok.stdout == (
        f"gate facts: passed (pass = 1 on {good}, >= 0.9)\ntiny-chat@1: validated -> approved\n"
    )
    card = orjson.loads(gw.cli("models", "show", "tiny-chat@1").stdout)
    assert card["state"] == "approved" and card["gates"][0]["run"] == good
    assert card["history"][-1]["gates"] == card["gates"]
    entry = next(e for e in admin_trail(url) if e["action"] == "model.approve")
    assert entry["actor"].endswith("(cli)") and entry["gates"] == card["gates"]
    assert [e["action"] for e in admin_trail(url)].count("model.approve.failed") == 0

    # The candidate's run is looked up, never taken on trust: an adapter must be deployed.
    run = gw.cli("eval", "run", str(suite), "--adapter", "tiny-legal@1", "--key", "k",
                 check=False)  # fmt: skip
    assert run.returncode == 2 and run.stderr == (
        "error: adapter tiny-legal@1 is not deployed: deploy it for evaluation with "
        "`bastion models deploy tiny-legal@1 --to ALIAS --staging`, then run again\n"
    )
