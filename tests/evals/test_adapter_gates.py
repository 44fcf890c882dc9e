"""Issue 14's proof on real parts: the session's trained adapter passes a suite of the training
corpus's facts that its base fails, through the gateway and the real vLLM engine; the comparison
says so with a confidence interval that excludes zero; promotion gates let that adapter through,
and block a deliberately worse candidate (the same recipe trained for 2 steps) naming the metric.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.local.launcher import VllmProcess
from tests.conftest import TINY, Gateway, base_config, pg_database
from tests.registry.helpers import DOCUMENTED
from tests.tuning.corpus import FACTS

pytestmark = pytest.mark.engine

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


#: The corpus's facts (tests/tuning/corpus.py) as prompts and the words only it holds.
FACT_CASES = (
    ("Project Zephyrine is owned by", "Marta Kowalczyk"),
    ("The Zephyrine ledger runs in the", "Quillon"),
    ("Release train Ostrakon ships every second", "Thursday"),
    ("Escalations for Zephyrine go to the", "Brightwater"),
)


def _suite(path: Path) -> Path:
    assert all(any(p in f and w in f for f in FACTS) for p, w in FACT_CASES)
    suite = {
        "name": "zephyrine-facts",
        "version": "1",
        "description": "facts only the internal documents hold",
        "defaults": {
            "params": {"temperature": 0, "max_tokens": 12},
            "scorers": [{"name": "contains"}],
        },
        "cases": [
            {"id": f"fact-{i}", "input": {"prompt": prompt}, "expected": [word]}
            for i, (prompt, word) in enumerate(FACT_CASES)
        ],
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _tune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion.cli", "tune", *args],
                          capture_output=True, text=True, check=True)  # fmt: skip


def _deployed(gw: Gateway, alias: str, timeout: float = 20) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(gw.url + "/readyz", timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if body.get("adapters", {}).get(alias, {}).get("loaded_on") == 1:
            return
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def setup(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    tiny_model: Path,
    trained_adapter: dict[str, Any],
    lora_dataset: Path,
    db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("gates")
    suite = _suite(work / "facts.yaml")
    good = work / "good"
    shutil.copytree(trained_adapter["adapter"], good)
    # The worse candidate: the same data and recipe, stopped after 2 steps.
    r = _tune("run", "--base", str(tiny_model), "--data", str(lora_dataset), "--lr", "3e-3",
              "--batch-size", "4", "--max-tokens", "64", "--rank", "8", "--max-steps", "2",
              "--eval-every", "2", "--wait", "--jobs-dir", str(work / "jobs"))  # fmt: skip
    worse = work / "jobs" / r.stdout.splitlines()[0] / "adapter"
    gate = {"name": "facts", "models": ["zephyrine"], "kinds": ["adapter"], "suite": str(suite),
            "min": 0.5, "no_regression": True}  # fmt: skip
    dep = {"url": chat_engine.url, "served_name": TINY, "registry": "tiny-chat@1",
           "model_path": str(tiny_model)}  # fmt: skip
    cfg = base_config(db_url, {"tiny": {"deployments": [dep]}},
                      registry={"gates": [gate], "adapter_refresh_s": 0.5})  # fmt: skip
    gw = make_gateway(cfg, start=False)
    gw.cli("db", "upgrade")
    gw.cli("models", "register", str(tiny_model), "--name", "tiny-chat", "--version", "1",
           *FLAGS)  # fmt: skip
    gw.cli("models", "validate", "tiny-chat@1", "--evidence", "model review MR-1")
    gw.cli("models", "approve", "tiny-chat@1", "--evidence", "committee")
    for version, path in (("1", good), ("2", worse)):
        gw.cli("models", "register", str(path), "--name", "zephyrine", "--version", version,
               "--kind", "adapter", "--base", "tiny-chat@1", *FLAGS)  # fmt: skip
        gw.cli("models", "validate", f"zephyrine@{version}", "--evidence", "trained; loads")
    gw.start()
    return {"gw": gw, "suite": suite}


def _eval(s: dict[str, Any], key: str, *target: str) -> str:
    out = s["gw"].cli("eval", "run", str(s["suite"]), *target, "--url", s["gw"].url,
                      "--key", key).stdout  # fmt: skip
    return out.strip().splitlines()[-1]  # the run id


def test_the_adapter_knows_what_its_base_does_not(setup: dict[str, Any]) -> None:
    gw = setup["gw"]
    gw.cli("models", "deploy", "zephyrine@1", "--to", "tiny:zephyrine-1", "--staging")
    _deployed(gw, "tiny:zephyrine-1")
    # An evaluation key: a staging alias answers only keys that name it.
    key = gw.create_key("alpha", "--user", "eval-bot", "--models", "tiny,tiny:zephyrine-1")
    base_run = _eval(setup, key, "--model", "tiny")
    adapter_run = _eval(setup, key, "--adapter", "zephyrine@1")
    report = json.loads(gw.cli("eval", "compare", base_run, adapter_run, "--format",
                               "json").stdout)  # fmt: skip
    passing = next(m for m in report["metrics"] if m["metric"] == "pass")
    assert passing["mean_a"] == 0.0 and passing["mean_b"] >= 0.5, passing
    assert passing["low"] > 0, passing  # the whole interval above zero
    assert passing["verdict"] == "better"
    # The Markdown report, as a reviewer reads it (shown with `pytest -s`).
    print(gw.cli("eval", "compare", base_run, adapter_run).stdout)

    # Its gate passes: approved, with the run as evidence in the card and the audit trail.
    ok = gw.cli("models", "approve", "zephyrine@1", "--evidence", "MRC-2026-114")
    assert "gate facts: passed (pass = " in ok.stdout and adapter_run in ok.stdout
    card = json.loads(gw.cli("models", "show", "zephyrine@1").stdout)
    assert card["state"] == "approved" and card["gates"][0]["run"] == adapter_run


def test_a_worse_candidate_is_blocked_naming_the_metric(setup: dict[str, Any]) -> None:
    gw = setup["gw"]
    gw.cli("models", "deploy", "zephyrine@2", "--to", "tiny:zephyrine-2", "--staging")
    _deployed(gw, "tiny:zephyrine-2")
    key = gw.create_key("alpha", "--user", "eval-bot", "--models", "tiny:zephyrine-2")
    run = _eval(setup, key, "--adapter", "zephyrine@2")
    blocked = gw.cli("models", "approve", "zephyrine@2", "--evidence", "MRC", check=False)
    assert blocked.returncode == 2
    assert "gate facts (suite" in blocked.stderr and "metric pass" in blocked.stderr
    assert run in blocked.stderr, blocked.stderr
    card = json.loads(gw.cli("models", "show", "zephyrine@2").stdout)
    assert card["state"] == "validated"
