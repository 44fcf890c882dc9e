"""A base candidate evaluated through a real gateway and the real tiny vLLM engine: the alias
declares `registry: tiny-chat@1` (`registry.enforce: warn`, so a validated version may serve
for evaluation), `bastion models approve --run-gates` runs the gate's missing suite through the
gateway, links the run to the version and approves on its evidence; `eval run --model` links
its run the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import orjson
import yaml

from bastion.evals import store
from bastion.local.launcher import VllmProcess
from bastion.store.db import make_engine
from tests.conftest import TINY, Gateway, base_config
from tests.registry.helpers import DOCUMENTED

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


def _suite(path: Path) -> Path:
    doc = {
        "name": "gate-smoke",
        "defaults": {"params": {"temperature": 0, "max_tokens": 12},
                     "scorers": [{"name": "regex", "params": {"pattern": r"(?s)\S.{7,}"}}]},
        "cases": [{"id": f"q{i}", "input": {"messages": [
            {"role": "user", "content": f"Tell me about number {i}."}]}} for i in range(6)],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def _answering(gw: Gateway, key: str) -> None:
    """Until the gateway has seen the engine healthy (its /readyz stays not ready in warn mode:
    the version is not approved)."""
    deadline = time.monotonic() + 60
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        while True:
            try:
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
                return
            except openai.APIStatusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def test_approve_run_gates_evaluates_the_candidate_through_the_gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    suite = _suite(tmp_path / "gate-smoke.yaml")
    db_url = f"sqlite:///{tmp_path}/b.db"
    dep = {"url": chat_engine.url, "served_name": TINY, "registry": "tiny-chat@1"}
    gate = {"name": "smoke", "suite": str(suite), "min": 0.5}
    registry = {"enforce": "warn", "gates": [gate]}
    gw = make_gateway(base_config(db_url, {"tiny": {"deployments": [dep]}}, registry=registry),
                      start=False)  # fmt: skip
    gw.cli("models", "register", str(tiny_model), "--name", "tiny-chat", "--version", "1",
           *FLAGS)  # fmt: skip
    gw.cli("models", "validate", "tiny-chat@1", "--evidence", "files and card checked")
    gw.start()
    key = gw.create_key("alpha", "--user", "svc-evals")
    _answering(gw, key)
    # Without --run-gates: blocked, naming the command that makes the run.
    bad = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC", check=False)
    assert bad.returncode == 2 and f"`bastion eval run {suite} --model tiny`" in bad.stderr
    ok = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC", "--run-gates",
                "--url", gw.url, "--key", key, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert f"gate smoke: running {suite} on tiny-chat@1 (tiny)" in ok.stderr
    run_id = ok.stdout.splitlines()[0]
    assert ok.stdout.splitlines()[1:] == [
        f"gate smoke: passed (pass = 1 on {run_id}, >= 0.5)",
        "tiny-chat@1: validated -> approved",
    ]
    engine = make_engine(db_url)
    run = store.get_run(engine, run_id)
    assert run is not None and run["registry_ref"] == "tiny-chat@1" and run["model"] == "tiny"
    assert run["status"] == "finished"
    rows = store.results(engine, run_id)
    assert len(rows) == 6 and all(0 < r["ttft_ms"] <= r["latency_ms"] for r in rows)
    engine.dispose()
    card = orjson.loads(gw.cli("models", "show", "tiny-chat@1").stdout)
    assert card["gates"][0]["run"] == run_id and card["gates"][0]["value"] == 1.0
    # An ordinary run of the alias is linked to the version it serves, too.
    again = gw.cli("eval", "run", str(suite), "--model", "tiny", "--url", gw.url, "--key", key)
    shown = gw.cli("eval", "show", again.stdout.strip()).stdout
    assert "suite gate-smoke v1 on tiny (tiny-chat@1), finished" in shown
