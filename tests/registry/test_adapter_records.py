"""Adapter deployments in the database, without engines: what `deploy` refuses, and that a
deployment whose adapter is no longer in a state its stage accepts (retired while it was being
deployed, or edited in the database) is kept off the engines with the reason."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.config import parse_settings
from bastion.core.errors import Conflict
from bastion.registry import adapters, records
from bastion.registry.digests import digest_dir
from bastion.registry.serving import AdapterServing
from bastion.routing.balancer import ModelRoute
from bastion.store.db import open_database
from bastion.store.schema import registry_models
from tests.registry.helpers import DOCUMENTED


def _record(db: Any, path: Path, name: str, kind: str, base: str | None = None) -> None:
    row = records.new_record(db, path, digest_dir(path), name=name, version="1", kind=kind,
                             created_by="t", base=base, **DOCUMENTED)  # fmt: skip
    rec = records.insert(db, row)
    for to in ("validated", "approved"):
        rec = records.transition(db, rec, to, "t", "e")


def test_a_deployment_whose_adapter_left_its_state_is_not_served(
    tiny_model: Path, tmp_path: Path
) -> None:
    db = open_database(f"sqlite:///{tmp_path}/a.db")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    _record(db, tiny_model, "base", "base")
    _record(db, adapter, "lora", "adapter", base="base@1")
    dep = {"url": "http://127.0.0.1:9", "served_name": "t", "registry": "base@1"}
    settings = parse_settings({"database": {"url": f"sqlite:///{tmp_path}/a.db"},
                               "models": {"tiny": {"deployments": [dep]}}})  # fmt: skip
    with pytest.raises(Conflict, match="is a model or router of the config"):
        adapters.deploy(db, settings, "lora@1", "tiny")
    with pytest.raises(Conflict, match="is a base model"):
        adapters.deploy(db, settings, "base@1", "tiny:base")
    row, replaced = adapters.deploy(db, settings, "lora@1", "tiny:lora")
    assert replaced is None and row["base_alias"] == "tiny"
    adapters.write(db, row, "t")
    with db.begin() as conn:  # as a retire racing the deploy would leave it
        conn.execute(
            sa.update(registry_models)
            .where(registry_models.c.name == "lora")
            .values(state="retired")
        )
    (active,) = adapters.active(db)
    assert (active.alias, active.state) == ("tiny:lora", "retired")
    routes = {"tiny": ModelRoute.build("tiny", settings.models["tiny"])}
    serving = AdapterServing(db, None, routes)  # type: ignore[arg-type]
    assert asyncio.run(serving._problem(active)) == "lora@1 is retired"
    db.dispose()
