"""Directory sign-in end to end: a real OpenLDAP slapd (LDAPS, nested groups), a real gateway
and vLLM engine, `bastion login` and `bastion keys mint`, the `openai` SDK with the session
token; leaving the group ends the session and revokes the self-service keys."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa

from bastion.local.launcher import VllmProcess
from bastion.store.schema import audit_entries
from tests.conftest import Gateway, base_config, engine_models, usage_rows
from tests.identity.slapd import PASSWORDS, user_dn

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def ldap_gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    slapd: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    db = tmp_path_factory.mktemp("ldap") / "b.db"
    cfg = base_config(f"sqlite:///{db}", engine_models(chat_engine, embed_engine))
    cfg["identity"].update(
        {
            "ldap": {
                "url": slapd.ldaps_url,
                "ca_file": str(slapd.ca_file),
                "bind_dn": slapd.service_dn,
                "bind_password": slapd.service_password,
                "user_base": slapd.base_dn,
                "group_base": slapd.group_base,
            },
            "group_cache_seconds": 1,
            "group_mappings": [
                {"group": "bastion-auditors", "team": "beta", "role": "auditor"},
                {"group": "all-engineering", "team": "alpha"},  # alice: via payments-devs
            ],
        }
    )
    gw = make_gateway(cfg)
    gw.wait_ready()
    return gw


def _cli(gw: Gateway, home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args, "--url", gw.url, "-c", str(gw.config_path)],
        input=stdin,
        capture_output=True,
        text=True,
        env={**gw.env, "XDG_CONFIG_HOME": str(home)},
        cwd=gw.workdir,
    )


def _login(gw: Gateway, home: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return _cli(gw, home, "login", "--user", user, "--password-stdin", stdin=password + "\n")


def _chat(gw: Gateway, token: str) -> Any:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0) as client:
        return client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )


def test_login_rejects_bad_credentials_and_injection(ldap_gateway: Gateway, tmp_path: Path) -> None:
    for user, password in (
        ("alice", "wrong"),
        ("*", PASSWORDS["alice"]),
        ("alice)(|(uid=*", PASSWORDS["alice"]),
        ("nobody", "x"),
    ):
        out = _login(ldap_gateway, tmp_path, user, password)
        assert out.returncode == 2 and "401" in out.stderr, (user, out.stderr)
    bob = _login(ldap_gateway, tmp_path, "bob", PASSWORDS["bob"])  # risk-analysts: not mapped
    assert bob.returncode == 2 and "403" in bob.stderr and "none of your groups" in bob.stderr


def test_login_mint_and_leaving_the_group(
    ldap_gateway: Gateway, slapd: Any, tmp_path: Path
) -> None:
    gw = ldap_gateway
    signed_in = _login(gw, tmp_path, "alice", PASSWORDS["alice"])
    assert signed_in.returncode == 0, signed_in.stderr
    session = signed_in.stdout.strip()
    assert session.startswith("bss-") and "team alpha" in signed_in.stderr
    assert (tmp_path / "bastion/session").stat().st_mode & 0o777 == 0o600
    rid = _chat(gw, session).headers["x-request-id"]
    (row,) = usage_rows(str(gw.config["database"]["url"]), request_id=rid)
    assert (row.user, row.team) == ("alice", "alpha")

    minted = _cli(gw, tmp_path, "keys", "mint", "--name", "notebook")
    assert minted.returncode == 0, minted.stderr
    key = minted.stdout.strip()
    assert _chat(gw, key).parse().choices

    # Another signed-in user cannot see or revoke alice's key: it does not exist for them.
    carol = _login(gw, tmp_path / "carol", "carol", PASSWORDS["carol"]).stdout.strip()
    mine = httpx.get(f"{gw.url}/auth/keys", headers={"Authorization": f"Bearer {session}"}).json()
    key_id = next(k["id"] for k in mine if k["name"] == "notebook")
    theirs = httpx.post(
        f"{gw.url}/auth/keys/{key_id}/revoke", headers={"Authorization": f"Bearer {carol}"}
    )
    assert theirs.status_code == 404
    assert (
        httpx.get(f"{gw.url}/auth/keys", headers={"Authorization": f"Bearer {carol}"}).json() == []
    )
    mint = httpx.post(f"{gw.url}/auth/keys", json={}, headers={"Authorization": f"Bearer {carol}"})
    assert mint.status_code == 403  # auditors mint no keys to call models

    slapd.remove_member("payments-devs", user_dn("alice"))
    try:
        deadline = time.monotonic() + 15
        session_error = key_error = None
        while time.monotonic() < deadline and not (session_error and key_error):
            time.sleep(0.5)
            if session_error is None:
                try:
                    _chat(gw, session)
                except openai.AuthenticationError as exc:
                    session_error = exc
            if key_error is None:
                try:
                    _chat(gw, key)
                except openai.AuthenticationError as exc:
                    key_error = exc
        assert session_error is not None and session_error.code == "session_revoked"
        assert key_error is not None and key_error.code == "key_revoked"
    finally:
        slapd.add_member("payments-devs", user_dn("alice"))
    # The trail shows the sign-ins and the sweep's revocation of alice's key.
    db = sa.create_engine(str(gw.config["database"]["url"]))
    deadline = time.monotonic() + 10
    while True:  # the store trails the log by the shipper's pace
        with db.connect() as conn:
            docs = [orjson.loads(d) for (d,) in conn.execute(sa.select(audit_entries.c.doc))]
        swept = any(
            d.get("action") == "key.revoke" and d.get("actor") == "directory-sweep" for d in docs
        )
        if swept or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    db.dispose()
    assert swept
    assert "login" in {d.get("action") for d in docs if d["kind"] == "auth"}


def test_repeated_failures_throttle_sign_in(ldap_gateway: Gateway) -> None:
    def attempt(password: str) -> httpx.Response:
        body = {"username": "carol", "password": password}
        return httpx.post(f"{ldap_gateway.url}/auth/login", json=body)

    for _ in range(5):  # identity.login_max_failures
        assert attempt("guess").status_code == 401
    throttled = attempt(PASSWORDS["carol"])  # even the right password waits now
    assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "login_throttled"
    assert int(throttled.headers["retry-after"]) > 0
