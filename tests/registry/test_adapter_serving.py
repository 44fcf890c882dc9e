"""From a trained adapter to an alias clients call, end to end on real parts: the session's
trained LoRA adapter is validated in the real vLLM engine, registered on a registered base,
approved, deployed with `bastion models deploy`, and called through two gateway replicas with the
`openai` SDK; the adapter alias answers with the facts of the training corpus that the base alias
does not know. Usage, audit and /v1/models know the adapter; an engine that lost it gets it back;
staging deployments are open only to keys that name them; retiring unloads; tampering refuses.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from bastion.config import parse_settings
from bastion.engines.client import EngineClient
from bastion.local.launcher import VllmProcess
from bastion.registry.serving import AdapterServing
from bastion.routing.balancer import ModelRoute
from bastion.store.db import open_database
from tests.conftest import TINY, Gateway, audit_docs, base_config, pg_database, usage_rows
from tests.registry.helpers import DOCUMENTED, admin_trail, copy_model, flip_byte
from tests.tuning.corpus import OWNER, OWNER_PROMPT

pytestmark = pytest.mark.engine

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]
ALIAS = "tiny:owner"


def _engine_adapters(engine: VllmProcess) -> set[str]:
    with urllib.request.urlopen(engine.url + "/v1/models", timeout=10) as resp:
        return {m["id"] for m in json.loads(resp.read())["data"] if m["id"] != TINY}


def _unload(engine: VllmProcess, name: str) -> None:
    """Behind Bastion's back, as an engine restart would (a 404: a gateway that found the files
    altered unloaded it first, which is as good)."""
    req = urllib.request.Request(
        engine.url + "/v1/unload_lora_adapter",
        data=json.dumps({"lora_name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def _adapters_ready(gw: Gateway) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(gw.url + "/readyz", timeout=5) as resp:
            return json.loads(resp.read()).get("adapters", {})
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read()).get("adapters", {})


def _wait(what: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _copy(adapter: Path, to: Path) -> Path:
    shutil.copytree(adapter, to)
    return to


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def fleet(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    tiny_model: Path,
    trained_adapter: dict[str, Any],
    db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Two gateway replicas on one database, the base registered and approved, the adapter
    validated in the engine, registered from its card, and approved."""
    work = tmp_path_factory.mktemp("adapters")
    adapter = _copy(trained_adapter["adapter"], work / "owner-v1")
    r = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "tune", "validate", str(adapter), "--engine-url",
         chat_engine.url, "--prompt", OWNER_PROMPT],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(r.stdout)["passed"] is True
    dep = {"url": chat_engine.url, "served_name": TINY, "registry": "tiny-chat@1",
           "model_path": str(tiny_model)}  # fmt: skip
    cfg = base_config(
        db_url,
        {"tiny": {"deployments": [dep]}},
        prices={"tiny": {"prompt": 1.0, "completion": 2.0}},
        registry={"adapter_refresh_s": 0.5},
    )
    first = make_gateway(cfg, start=False)
    first.cli("db", "upgrade")
    first.cli("models", "register", str(tiny_model), "--name", "tiny-chat", "--version", "1",
              *FLAGS)  # fmt: skip
    first.cli("models", "validate", "tiny-chat@1", "--evidence", "model review MR-1")
    first.cli("models", "approve", "tiny-chat@1", "--evidence", "committee 2026-11")
    out = first.cli("models", "register", str(adapter), "--name", "owner-facts", "--version", "1",
                    "--kind", "adapter", "--base", "tiny-chat@1", *FLAGS).stdout  # fmt: skip
    assert "registered owner-facts@1 (adapter, draft)" in out
    first.cli("models", "validate", "owner-facts@1", "--evidence", "tune validate: passed")
    first.cli("models", "approve", "owner-facts@1", "--evidence", "committee 2026-11")
    first.start()
    second = make_gateway(cfg)  # another replica, started before the adapter is deployed
    return {"gws": [first, second], "work": work, "adapter": adapter, "engine": chat_engine}


def test_the_card_gives_the_adapter_its_lineage(fleet: dict[str, Any], tiny_model: Path) -> None:
    rec = json.loads(fleet["gws"][0].cli("models", "show", "owner-facts@1").stdout)
    base = json.loads(fleet["gws"][0].cli("models", "show", "tiny-chat@1").stdout)
    lineage = rec["lineage"]
    assert lineage["base_sha256"] == base["manifest_sha256"]
    assert lineage["hyperparameters"]["rank"] == 8 and lineage["training"]["steps"] > 0
    assert lineage["validation"]["passed"] is True
    # Registered against a base with other weights, the card gives it away.
    other = copy_model(tiny_model, fleet["work"] / "other-base")
    flip_byte(next(other.glob("*.safetensors")))
    fleet["gws"][0].cli("models", "register", str(other), "--name", "other-base", "--version",
                        "1", *FLAGS)  # fmt: skip
    wrong = fleet["gws"][0].cli("models", "register", str(fleet["adapter"]), "--name", "x",
                                "--version", "1", "--kind", "adapter", "--base", "other-base@1",
                                check=False)  # fmt: skip
    assert wrong.returncode == 2
    assert "was trained on a base with manifest digest" in wrong.stderr, wrong.stderr


def test_deployed_adapter_answers_through_every_replica(fleet: dict[str, Any], db_url: str) -> None:
    first, second = fleet["gws"]
    draft = first.cli("models", "deploy", "tiny-chat@1", "--to", "tiny:base", check=False)
    assert "is a base model" in draft.stderr
    taken = first.cli("models", "deploy", "owner-facts@1", "--to", "tiny", check=False)
    assert "is a model or router of the config" in taken.stderr
    out = first.cli("models", "deploy", "owner-facts@1", "--to", ALIAS).stdout
    assert f"deployed owner-facts@1 as {ALIAS}" in out and "stage serve" in out
    for gw in (first, second):
        _wait(lambda gw=gw: _adapters_ready(gw).get(ALIAS, {}).get("loaded_on") == 1)
    assert "owner-facts@1" in _engine_adapters(fleet["engine"])

    key = first.create_key("alpha", "--user", "alice")
    with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
        listed = {m.id: m for m in client.models.list().data}
        assert ALIAS in listed and listed[ALIAS].model_extra["parent"] == "tiny"
        raw = client.completions.with_raw_response.create(
            model=ALIAS, prompt=OWNER_PROMPT, max_tokens=16, temperature=0
        )
        adapted = raw.parse()
        assert adapted.model == ALIAS
        assert adapted.choices[0].text.startswith(f" {OWNER}"), adapted.choices[0].text
        base = client.completions.create(
            model="tiny", prompt=OWNER_PROMPT, max_tokens=16, temperature=0
        )
        assert OWNER not in base.choices[0].text
        streamed = client.completions.create(
            model=ALIAS, prompt=OWNER_PROMPT, max_tokens=16, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == adapted.choices[0].text
    rid = raw.headers["x-request-id"]
    (row,) = usage_rows(db_url, request_id=rid)
    assert (row.model, row.served_model, row.adapter) == (ALIAS, "tiny", "owner-facts@1")
    assert row.cost_micros > 0  # at the base alias's price
    (base_row,) = usage_rows(db_url, model="tiny")
    assert base_row.adapter is None

    docs = audit_docs(
        db_url,
        until=lambda ds: {"request", "completion"} <= {d["kind"] for d in ds},
        request_id=rid,
    )
    entries = {d["kind"]: d for d in docs}
    assert entries["request"]["adapter"] == "owner-facts@1"
    assert entries["request"]["model"] == ALIAS
    assert entries["completion"]["adapter"] == "owner-facts@1"
    assert entries["completion"]["engine_model"] == "owner-facts@1"
    actions = [(e["action"], e.get("model")) for e in admin_trail(db_url)]
    for step in ("register", "validate", "approve", "deploy"):
        assert (f"model.{step}", "owner-facts@1") in actions


def test_an_engine_that_lost_the_adapter_gets_it_back(fleet: dict[str, Any]) -> None:
    """As after an engine restart the gateway did not notice: the engine answers 404 for the
    adapter, the gateway reloads it and the request still succeeds."""
    first, _ = fleet["gws"]
    _unload(fleet["engine"], "owner-facts@1")  # (a round may reload it first: as good)
    key = first.create_key("alpha", "--user", "alice")
    with openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0) as client:
        out = client.completions.create(model=ALIAS, prompt=OWNER_PROMPT, max_tokens=16,
                                        temperature=0)  # fmt: skip
    assert out.choices[0].text.startswith(f" {OWNER}")
    assert "owner-facts@1" in _engine_adapters(fleet["engine"])


def test_staging_is_for_keys_that_name_it(fleet: dict[str, Any], db_url: str) -> None:
    first, second = fleet["gws"]
    v2 = _copy(fleet["adapter"], fleet["work"] / "owner-v2")
    first.cli("models", "register", str(v2), "--name", "owner-facts", "--version", "2",
              "--kind", "adapter", "--base", "tiny-chat@1", *FLAGS)  # fmt: skip
    early = first.cli("models", "deploy", "owner-facts@2", "--to", "tiny:next", "--staging",
                      check=False)  # fmt: skip
    assert "is draft: a staging deployment needs it validated or approved" in early.stderr
    first.cli("models", "validate", "owner-facts@2", "--evidence", "tune validate: passed")
    serve = first.cli("models", "deploy", "owner-facts@2", "--to", "tiny:next", check=False)
    assert "a validated one may be deployed with --staging" in serve.stderr
    first.cli("models", "deploy", "owner-facts@2", "--to", "tiny:next", "--staging")
    _wait(lambda: _adapters_ready(second).get("tiny:next", {}).get("loaded_on") == 1)

    anyone = first.create_key("alpha", "--user", "alice")
    evaluator = first.create_key("alpha", "--user", "eval-bot", "--models", "tiny:next")
    with openai.OpenAI(base_url=second.url + "/v1", api_key=anyone, max_retries=0) as client:
        assert "tiny:next" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.PermissionDeniedError, match="staging deployment"):
            client.completions.create(model="tiny:next", prompt="x", max_tokens=2)
    with openai.OpenAI(base_url=second.url + "/v1", api_key=evaluator, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == ["tiny:next"]
        out = client.completions.create(model="tiny:next", prompt=OWNER_PROMPT, max_tokens=16,
                                        temperature=0)  # fmt: skip
        assert out.choices[0].text.startswith(f" {OWNER}")
        # The key names only the adapter alias: the base alias stays closed to it.
        with pytest.raises(openai.PermissionDeniedError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
    first.cli("models", "undeploy", "tiny:next", "--reason", "evaluation done")
    _wait(lambda: "owner-facts@2" not in _engine_adapters(fleet["engine"]))
    actions = [(e["action"], e.get("model")) for e in admin_trail(db_url)]
    assert ("model.undeploy", "owner-facts@2") in actions


def test_a_round_that_read_the_table_before_a_deploy_unloads_nothing_deployed(
    fleet: dict[str, Any], db_url: str
) -> None:
    """Two replicas: one reads the table, another deploys and loads, the first then lists the
    engine and finds an adapter it does not know of. It reads the table again before unloading,
    so the other replica's load stands (the race that let a request find its adapter gone)."""
    first = fleet["gws"][0]
    v4 = _copy(fleet["adapter"], fleet["work"] / "owner-v4")
    first.cli("models", "register", str(v4), "--name", "owner-facts", "--version", "4",
              "--kind", "adapter", "--base", "tiny-chat@1", *FLAGS)  # fmt: skip
    first.cli("models", "validate", "owner-facts@4", "--evidence", "tune validate: passed")
    first.cli("models", "approve", "owner-facts@4", "--evidence", "committee 2026-11")
    first.cli("models", "deploy", "owner-facts@4", "--to", "tiny:v4")
    _wait(lambda: "owner-facts@4" in _engine_adapters(fleet["engine"]))
    cfg = parse_settings(yaml.safe_load(first.config_path.read_text()))
    routes = {"tiny": ModelRoute.build("tiny", cfg.models["tiny"])}
    db = open_database(db_url)

    async def stale_round() -> None:
        client = EngineClient()
        await client.start()
        try:
            serving = AdapterServing(db, client, routes)
            dep = routes["tiny"].deployments[0]
            await serving._sync("tiny", dep, {})  # what a round that read nothing deployed does
        finally:
            await client.stop()

    try:
        asyncio.run(stale_round())
    finally:
        db.dispose()
    assert "owner-facts@4" in _engine_adapters(fleet["engine"])
    first.cli("models", "undeploy", "tiny:v4", "--reason", "race checked")
    _wait(lambda: "owner-facts@4" not in _engine_adapters(fleet["engine"]))


def test_retiring_unloads_and_tampering_refuses(fleet: dict[str, Any], db_url: str) -> None:
    first, second = fleet["gws"]
    v3 = _copy(fleet["adapter"], fleet["work"] / "owner-v3")
    first.cli("models", "register", str(v3), "--name", "owner-facts", "--version", "3",
              "--kind", "adapter", "--base", "tiny-chat@1", *FLAGS)  # fmt: skip
    first.cli("models", "validate", "owner-facts@3", "--evidence", "tune validate: passed")
    first.cli("models", "approve", "owner-facts@3", "--evidence", "committee 2026-11")
    first.cli("models", "deploy", "owner-facts@3", "--to", "tiny:v3")
    _wait(lambda: _adapters_ready(second).get("tiny:v3", {}).get("loaded_on") == 1)
    # Altered on disk while served, then lost by the engine (as in a restart): the gateway
    # checks the files before loading them again, and refuses.
    flip_byte(v3 / "adapter_model.safetensors", offset=200)
    _unload(fleet["engine"], "owner-facts@3")
    key = first.create_key("alpha", "--user", "alice")
    with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError, match="is not what was registered"):
            client.completions.create(model="tiny:v3", prompt="x", max_tokens=2)
    assert "owner-facts@3" not in _engine_adapters(fleet["engine"])
    assert "is not what was registered" in _adapters_ready(second)["tiny:v3"]["reason"]
    first.cli("models", "undeploy", "tiny:v3", "--reason", "files altered")
    tampered = first.cli("models", "deploy", "owner-facts@3", "--to", "tiny:v3", check=False)
    assert "is not what was registered: hash mismatch: adapter_model.safetensors" in (
        tampered.stderr
    ), tampered.stderr

    first.cli("models", "retire", "owner-facts@1", "--reason", "superseded")
    listed = first.cli("models", "deployments").stdout
    assert ALIAS not in listed
    _wait(lambda: "owner-facts@1" not in _engine_adapters(fleet["engine"]))
    with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
        _wait(lambda: ALIAS not in {m.id for m in client.models.list().data})
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=ALIAS, prompt="x", max_tokens=2)
    actions = [(e["action"], e.get("model")) for e in admin_trail(db_url)]
    assert ("model.retire", "owner-facts@1") in actions
