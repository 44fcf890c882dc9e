"""Stored responses on a real (SQLite) database with the audit trail's real key store: sealed
per team, rebuilt into a conversation, unreadable once the team is shredded, deleted after
retention. (Across two gateway replicas on PostgreSQL: wire/test_responses.py.)"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from starlette.datastructures import Headers

from bastion.audit import store as audit_store
from bastion.audit.crypto import MasterKey
from bastion.audit.trail import TeamKeys
from bastion.core.errors import InvalidRequest, NotFound
from bastion.gateway.settings import ResponsesSettings
from bastion.gateway.stored_responses import ResponseStore, TeamSealer
from bastion.gateway.wire.responses import RESPONSES
from bastion.identity.principal import Principal
from bastion.metering.usage import UsageRecord
from bastion.store.db import open_database
from bastion.store.schema import responses


def _store(tmp_path: Path, **settings: object) -> ResponseStore:
    db = open_database(f"sqlite:///{tmp_path / 'b.db'}")
    keys = TeamKeys(db, MasterKey(os.urandom(32)))
    return ResponseStore(ResponsesSettings(**settings), db, TeamSealer(db, keys))  # type: ignore[arg-type]


def _principal(team: str) -> Principal:
    return Principal(key_id="k1", team=team, cost_center="cc", user="u", models=None)


def _keep(store: ResponseStore, team: str, body: dict, rid: str) -> None:
    req = RESPONSES.parse(orjson.dumps(body), Headers())
    asyncio.run(store.prepare(_principal(team), req))
    response = {
        "id": rid,
        "status": "completed",
        "output": [{"type": "message", "role": "assistant", "content": [{"text": rid}]}],
    }
    rec = UsageRecord(request_id="req_" + rid, endpoint="responses", team=team, model="m")
    asyncio.run(store.keep(rec, req, response))


def test_sealed_per_team_and_chained(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _keep(store, "alpha", {"model": "m", "input": "first"}, "resp_1")
    _keep(
        store,
        "alpha",
        {"model": "m", "input": "second", "previous_response_id": "resp_1"},
        "resp_2",
    )
    doc = asyncio.run(store.read("alpha", "resp_2"))
    assert doc is not None
    assert [i.get("content") for i in doc["input"]] == [
        "first",
        [{"text": "resp_1"}],
        "second",
    ]
    assert asyncio.run(store.read("beta", "resp_2")) is None  # another team: as if unknown
    with store.db.connect() as conn:
        row = conn.execute(sa.select(responses).where(responses.c.id == "resp_2")).one()
    assert b"second" not in row.content and row.previous_id == "resp_1"
    with pytest.raises(NotFound):
        asyncio.run(store.get("beta", "resp_1"))
    # Another team cannot continue it either.
    req = RESPONSES.parse(b'{"model":"m","input":"x","previous_response_id":"resp_1"}', Headers())
    with pytest.raises(NotFound):
        asyncio.run(store.prepare(_principal("beta"), req))


def test_store_false_keeps_nothing_and_shredding_makes_it_unreadable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _keep(store, "alpha", {"model": "m", "input": "x", "store": False}, "resp_no")
    assert asyncio.run(store.read("alpha", "resp_no")) is None
    _keep(store, "alpha", {"model": "m", "input": "x"}, "resp_yes")
    assert asyncio.run(store.read("alpha", "resp_yes")) is not None
    assert audit_store.shred(store.db, "alpha") == 1
    assert asyncio.run(store.read("alpha", "resp_yes")) is None


def test_retention_and_storage_off(tmp_path: Path) -> None:
    store = _store(tmp_path, retention_days=2)
    _keep(store, "alpha", {"model": "m", "input": "x"}, "resp_old")
    assert store.purge(datetime.now(UTC) + timedelta(days=1)) == 0
    assert store.purge(datetime.now(UTC) + timedelta(days=3)) == 1
    assert asyncio.run(store.read("alpha", "resp_old")) is None
    (tmp_path / "off").mkdir()
    off = _store(tmp_path / "off", store=False)
    req = RESPONSES.parse(b'{"model":"m","input":"x","previous_response_id":"r"}', Headers())
    with pytest.raises(InvalidRequest):
        asyncio.run(off.prepare(_principal("alpha"), req))
