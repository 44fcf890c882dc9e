"""Promotion gates at approval, over the admin API (in-process, SQLite and PostgreSQL): a missing
run blocks with the command that makes it, a threshold miss and a regression beyond the CI
block naming the metric, and a pass records its evidence in the history, the audit trail and
the record (the model card). Runs are stored through the evals store as `eval run` stores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.store.db import open_database
from tests.conftest import audit_config
from tests.identity.oidc_provider import DEFAULT_RESOURCE
from tests.registry.gate_helpers import first_n, stored_run, suite_file
from tests.registry.helpers import DOCUMENTED, admin_trail

ADMIN = "registry-admin-key-0123456789"
H = {"Authorization": f"Bearer {ADMIN}"}


def _app(db_url: str, tmp: Path, suite: Path, approval: str = "single", oidc: Any = None) -> Any:
    gates = [{"models": ["tiny-*"], "suite": str(suite), "metric": "pass", "min": 0.8,
              "no_regression": True}]  # fmt: skip
    cfg: dict[str, Any] = {
        "database": {"url": db_url},
        "admin": {"key": ADMIN},
        "audit": audit_config(tmp),
        "registry": {"approval": approval, "gates": gates},
        "models": {},
        "cost_centers": {"cc": {}},
        "teams": {"ops": {"cost_center": "cc"}},
    }
    if oidc is not None:
        cfg["identity"] = {
            "oidc": [{"issuer": oidc.issuer, "audience": DEFAULT_RESOURCE, "user_claim":
                      "preferred_username"}],
            "group_mappings": [{"group": "bastion-admins", "team": "ops", "role": "admin"}],
        }  # fmt: skip
        # The admin key's holder is a custodian with no named account here: a third person.
        cfg["admin"] = {**cfg["admin"], "key_may_approve": True}
    return build_app(parse_settings(cfg))


def _validated(c: TestClient, model: Path, version: str, headers: dict[str, str] = H) -> str:
    body = {"path": str(model), "name": "tiny-chat", "version": version, "kind": "base",
            **DOCUMENTED}  # fmt: skip
    assert c.post("/admin/models", json=body, headers=headers).status_code == 201
    r = c.post(f"/admin/models/tiny-chat/{version}/validate", json={"evidence": "e"},
               headers=headers)  # fmt: skip
    assert r.status_code == 200, r.text
    return f"/admin/models/tiny-chat/{version}"


def _blocked(c: TestClient, url: str, headers: dict[str, str] = H) -> str:
    r = c.post(f"{url}/approve", json={"evidence": "MRC"}, headers=headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "gate_failed"
    return str(r.json()["error"]["message"])


def test_gates_block_and_record_evidence(db_url: str, tiny_model: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path)
    db = open_database(db_url)
    with TestClient(_app(db_url, tmp_path, suite)) as c:
        v1 = _validated(c, tiny_model, "1")
        # No run on the candidate: blocked, with the command that makes one.
        msg = _blocked(c, v1)
        assert "gate facts:pass (suite " in msg and "metric pass" in msg
        assert "no finished run of suite facts as it is now" in msg
        assert f"`bastion eval run {suite} --model ALIAS" in msg
        # A run that did not finish, or on another version, is no evidence.
        stored_run(db, suite, "tiny-chat@1", first_n(40), status="incomplete")
        stored_run(db, suite, "tiny-chat@9", first_n(40))
        assert "no finished run" in _blocked(c, v1)
        # A finished run under the threshold: blocked, naming the metric, value and threshold.
        low = stored_run(db, suite, "tiny-chat@1", first_n(30))
        msg = _blocked(c, v1)
        assert f"pass = 0.75 on run {low}, needs >= 0.8" in msg, msg
        # A newer, passing run: approved; nothing in production to regress against.
        (dry,) = c.get(f"{v1}/gates", headers=H).json()  # where it stands, approving nothing
        assert not dry["passed"] and dry["run"] == low and "needs >= 0.8" in dry["failure"]
        good1 = stored_run(db, suite, "tiny-chat@1", first_n(40))
        assert c.get(f"{v1}/gates", headers=H).json()[0]["passed"]
        assert c.get(v1, headers=H).json()["state"] == "validated"
        r = c.post(f"{v1}/approve", json={"evidence": "MRC"}, headers=H)
        assert r.status_code == 200, r.text
        (ev,) = r.json()["history"][-1]["gates"]
        assert ev["run"] == good1 and ev["value"] == 1.0 and ev["min"] == 0.8 and ev["passed"]
        assert ev["regression"] == {"verdict": "no version in production"}
        assert r.json()["gates"] == [ev]  # the model card shows it at the top

        # Version 2 against version 1 in production.
        v2 = _validated(c, tiny_model, "2")
        stored_run(db, suite, "tiny-chat@2", first_n(35))  # 0.875: meets 0.8 ...
        msg = _blocked(c, v2)  # ... but 5 of 40 cases broke: worse beyond the CI
        assert "pass regressed against tiny-chat@1" in msg and f"(run {good1})" in msg, msg
        assert "1 -> 0.875, delta -0.125, 95% CI [" in msg and "excludes 0" in msg
        assert "needs >=" not in msg
        good2 = stored_run(db, suite, "tiny-chat@2", first_n(40))
        r = c.post(f"{v2}/approve", json={"evidence": "MRC 2"}, headers=H)
        assert r.status_code == 200, r.text
        (ev,) = r.json()["gates"]
        reg = ev["regression"]
        assert ev["run"] == good2 and reg["production"] == "tiny-chat@1" and reg["run"] == good1
        assert reg["verdict"] == "no detectable difference" and reg["ci"] == [0.0, 0.0]
        assert reg["n"] == 40 and reg["level"] == 0.95
        shown = c.get(v2, headers=H).json()
        assert shown["gates"] == [ev] and shown["history"][-1]["evidence"] == "MRC 2"
    entries = [e for e in admin_trail(db_url) if e["action"].startswith("model.approve")]
    assert [e["action"] for e in entries] == ["model.approve"] * 2
    assert [e["gates"][0]["run"] for e in entries] == [good1, good2]
    assert entries[1]["gates"][0]["regression"]["verdict"] == "no detectable difference"
    db.dispose()


def test_four_eyes_checks_gates_when_asked_and_again_when_decided(
    oidc_provider: Any, tiny_model: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/r.db"
    suite = suite_file(tmp_path)
    db = open_database(db_url)
    with TestClient(_app(db_url, tmp_path, suite, "four-eyes", oidc_provider)) as c:
        frank = {"Authorization": f"Bearer {oidc_provider.token('frank-cli')}"}
        gina = {"Authorization": f"Bearer {oidc_provider.token('gina-cli')}"}
        v1 = _validated(c, tiny_model, "1", frank)
        assert "no finished run" in _blocked(c, v1, gina)  # no request is even made
        first = stored_run(db, suite, "tiny-chat@1", first_n(40))
        asked = c.post(f"{v1}/approve", json={"evidence": "MRC"}, headers=gina)
        assert asked.status_code == 202, asked.text
        assert asked.json()["approval"]["subject"]["gates"][0]["run"] == first
        # Meanwhile a newer run falls under the threshold: the decision is blocked.
        low = stored_run(db, suite, "tiny-chat@1", first_n(20))
        r = c.post(f"/admin/approvals/{asked.json()['approval']['id']}/approve", headers=H)
        assert r.status_code == 409 and r.json()["error"]["code"] == "gate_failed", r.text
        assert f"pass = 0.5 on run {low}, needs >= 0.8" in r.json()["error"]["message"]
        rec = c.get(v1, headers=H).json()
        assert rec["state"] == "validated" and rec["approval"] is None  # free to ask again
        better = stored_run(db, suite, "tiny-chat@1", first_n(40))
        asked = c.post(f"{v1}/approve", json={"evidence": "MRC 2"}, headers=gina)
        assert asked.status_code == 202, asked.text
        done = c.post(f"/admin/approvals/{asked.json()['approval']['id']}/approve", headers=H)
        assert done.status_code == 200, done.text
        rec = c.get(v1, headers=H).json()
        assert rec["state"] == "approved" and rec["gates"][0]["run"] == better
        assert rec["history"][-1]["requested_by"] == "gina"
    trail = admin_trail(db_url)
    failed = [e for e in trail if e["action"] == "model.approve.approved.failed"]
    assert len(failed) == 1 and "gate_failed" not in failed[0]["error"]
    assert "needs >= 0.8" in failed[0]["error"]
    change = [e for e in trail if e["action"] == "model.approve"]
    assert len(change) == 1 and change[0]["actor"] == "admin-key"
    assert change[0]["gates"][0]["run"] == better and change[0]["approval"]
    db.dispose()
