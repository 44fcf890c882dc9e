"""Console sign-in at the IdP, end to end: Debian's Chromium (Playwright) signs in through a real
`oidc-provider` (authorization code + PKCE, its own login and consent pages) to a real
`bastion serve` with no directory configured, so the session path stands on its own.

Checks: a confidential client (secret from the environment) and a public client (PKCE alone)
both sign in; groups decide the role (member, team-admin) and so the pages, 404 for the others;
a user in no mapped group is refused with the reason; a forged or missing `state`, a callback
without a started flow and the IdP's own error are refused on the login page; sign-out revokes
the session (the old cookie no longer works); a team-admin mints a team key and revokes a
member's key through the admin API's handlers (audited as such).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
import yaml
from playwright.sync_api import Browser

from bastion.store.schema import audit_entries, sessions
from tests.conftest import Gateway, base_config
from tests.console.conftest import Visitor, visitors
from tests.identity.oidc_provider import DEFAULT_RESOURCE, OidcProvider

CLIENT = "bastion-console"
PUBLIC = "bastion-console-public"
SECRET_ENV = "BASTION_TEST_CONSOLE_OIDC_SECRET"
#: IdP accounts (the login name at the IdP's page) and their ID token claims.
USERS = {
    "dora": {"preferred_username": "dora", "groups": ["payments-devs"]},
    "emil": {"preferred_username": "emil", "groups": ["alpha-admins", "payments-devs"]},
    "fay": {"preferred_username": "fay", "groups": ["marketing"]},
}
Visit = Callable[[], Visitor]


def _console_config(work: Path, issuer: str, console: dict[str, Any]) -> dict[str, Any]:
    # No engine is needed to sign in: the model's deployment is simply down.
    models = {"tiny": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "tiny"}]}}
    cfg = base_config(f"sqlite:///{work / 'b.db'}", models)
    issuer_cfg = {"issuer": issuer, "audience": DEFAULT_RESOURCE, "console": console,
                  "user_claim": "preferred_username"}  # fmt: skip
    cfg["identity"].update(
        {
            "oidc": [issuer_cfg],
            "group_mappings": [
                {"group": "alpha-admins", "team": "alpha", "role": "team-admin"},
                {"group": "payments-devs", "team": "alpha"},
            ],
        }
    )
    return cfg


@pytest.fixture(scope="module")
def idp_setup(
    make_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, OidcProvider, Gateway]]:
    """A gateway with a confidential console client and one with a public client (PKCE
    alone), both at the same real IdP."""
    work = tmp_path_factory.mktemp("console-oidc")
    # Their ports are known before they start: the IdP must know their callbacks.
    gw = make_gateway({}, start=False)
    public = make_gateway({}, start=False)
    provider = OidcProvider(
        {},
        work / "provider.log",
        web_clients={
            CLIENT: {"redirect_uris": [gw.url + "/console/oidc/callback"]},
            PUBLIC: {"redirect_uris": [public.url + "/console/oidc/callback"], "public": True},
        },
        users=USERS,
    )
    os.environ[SECRET_ENV] = provider.secret(CLIENT)
    scopes = ["openid", "profile", "groups"]
    for g, console in (
        (gw, {"client_id": CLIENT, "client_secret": "${" + SECRET_ENV + "}", "name": "Bank SSO"}),
        (public, {"client_id": PUBLIC, "name": "Bank SSO"}),
    ):
        g.config.update(_console_config(g.workdir, provider.issuer, {**console, "scopes": scopes}))
        g.config_path.write_text(yaml.safe_dump(g.config))
    try:
        gw.start()
        public.start()
        yield gw, provider, public
    finally:
        gw.stop()
        public.stop()
        provider.stop()
        os.environ.pop(SECRET_ENV, None)


@pytest.fixture(scope="module")
def idp_gateway(
    idp_setup: tuple[Gateway, OidcProvider, Gateway],
) -> tuple[Gateway, OidcProvider]:
    return idp_setup[0], idp_setup[1]


@pytest.fixture
def visit(browser: Browser, idp_gateway: tuple[Gateway, OidcProvider]) -> Iterator[Visit]:
    # Uncaught script errors only: the IdP's pages are not ours to hold to the console's rules.
    with visitors(browser, idp_gateway[0].url, console_errors=False) as make:
        yield make


def _at_idp(v: Visitor, login: str) -> None:
    """From the console's login page through the IdP's login and consent pages."""
    v.goto("/console/login")
    assert v.page.inner_text("#sso-1") == "Sign in with Bank SSO"
    v.page.click("#sso-1")
    v.page.wait_for_selector("input[name=login]")
    v.page.fill("input[name=login]", login)
    v.page.fill("input[name=password]", "anything")  # the IdP's development login
    v.page.click("button.login-submit")
    v.page.wait_for_selector("input[name=prompt][value=consent]", state="attached")
    v.page.click("button.login-submit")


def _sign_in(v: Visitor, login: str) -> None:
    _at_idp(v, login)
    v.page.wait_for_url(v.base + "/console/")


def _audit(gw: Gateway, action: str) -> list[dict[str, Any]]:
    db = sa.create_engine(str(gw.config["database"]["url"]))
    deadline = time.monotonic() + 15
    try:
        while True:
            with db.connect() as conn:
                docs = [orjson.loads(d) for (d,) in conn.execute(sa.select(audit_entries.c.doc))]
            found = [d for d in docs if d.get("kind") == "auth" and d.get("action") == action]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    finally:
        db.dispose()


def test_a_member_signs_in_at_the_idp_and_sees_only_member_pages(
    visit: Visit, idp_gateway: tuple[Gateway, OidcProvider]
) -> None:
    gw, provider = idp_gateway
    v = visit()
    _sign_in(v, "dora")
    assert v.page.inner_text("#whoami") == "dora · alpha · member"
    nav = v.page.locator("header nav a").all_inner_texts()
    assert nav == ["Overview", "Keys"]
    for path in ("/console/usage", "/console/models", "/console/limits", "/console/audit"):
        assert v.goto(path).status == 404, path
    assert v.goto("/console/keys").status == 200
    # The session cookie is the gateway's own session, Strict and HttpOnly; the flow is gone.
    cookies = {c["name"]: c for c in v.context.cookies()}
    session = cookies["bastion_session"]
    assert session["value"].startswith("bss-") and session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert "bastion_oidc_flow" not in cookies
    # Audited as a directory sign-in is, with the method.
    (entry,) = [e for e in _audit(gw, "login") if e["actor"] == "dora"]
    assert entry["team"] == "alpha" and entry["method"] == "oidc"
    assert entry["idp"] == provider.issuer
    assert not v.errors


def test_a_public_client_signs_in_with_pkce_alone(
    visit: Visit, idp_setup: tuple[Gateway, OidcProvider, Gateway]
) -> None:
    public = idp_setup[2]
    v = visit()
    v.base = public.url  # the same IdP, the gateway whose console client has no secret
    _sign_in(v, "dora")
    assert v.page.inner_text("#whoami") == "dora · alpha · member"


def test_groups_make_a_team_admin_who_sees_the_team_pages(visit: Visit) -> None:
    v = visit()
    _sign_in(v, "emil")  # alpha-admins is mapped before payments-devs: first match wins
    assert v.page.inner_text("#whoami") == "emil · alpha · team-admin"
    nav = v.page.locator("header nav a").all_inner_texts()
    assert nav == ["Overview", "Usage and spend", "Keys", "Models", "Limits"]
    for path in ("/console/usage", "/console/models", "/console/limits"):
        assert v.goto(path).status == 200, path
    assert v.goto("/console/audit").status == 404


def test_a_user_in_no_mapped_group_is_refused_with_the_reason(
    visit: Visit, idp_gateway: tuple[Gateway, OidcProvider]
) -> None:
    v = visit()
    _at_idp(v, "fay")
    v.page.wait_for_selector("#error")
    assert "none of your groups is mapped" in v.page.inner_text("#error")
    assert v.page.url.startswith(v.base + "/console/oidc/callback")
    assert "bastion_session" not in {c["name"] for c in v.context.cookies()}
    assert v.goto("/console/").url == v.base + "/console/login"
    failed = [e for e in _audit(idp_gateway[0], "login.failed") if e.get("method") == "oidc"]
    assert any(e["reason"] == "no_mapped_group" and e["actor"] == "fay" for e in failed)


def test_a_forged_or_missing_state_and_a_callback_nobody_started_are_refused(
    visit: Visit, idp_gateway: tuple[Gateway, OidcProvider]
) -> None:
    provider = idp_gateway[1]
    v = visit()
    # A callback this browser never started (no flow cookie): refused.
    assert v.goto("/console/oidc/callback?code=abc&state=xyz").status == 401
    assert "not started in this browser" in v.page.inner_text("#error")
    # Start a real flow, then arrive with a forged state, and with none.
    v.goto("/console/login")
    v.page.click("#sso-1")
    v.page.wait_for_url(provider.issuer + "/**")
    flow = [c for c in v.context.cookies() if c["name"] == "bastion_oidc_flow"]
    assert flow and flow[0]["sameSite"] == "Lax" and flow[0]["path"] == "/console/oidc"
    assert v.goto("/console/oidc/callback?code=abc&state=forged").status == 401
    assert "state does not match" in v.page.inner_text("#error")
    # A refused callback ends the flow: the next try has no flow to finish.
    assert v.goto("/console/oidc/callback?code=abc").status == 401
    assert "not started in this browser" in v.page.inner_text("#error")
    v.goto("/console/login")
    v.page.click("#sso-1")
    v.page.wait_for_url(provider.issuer + "/**")
    assert v.goto("/console/oidc/callback?code=abc").status == 401
    assert "state does not match" in v.page.inner_text("#error")
    # The IdP's own error is shown as the IdP said it.
    v.goto("/console/login")
    v.page.click("#sso-1")
    v.page.wait_for_url(provider.issuer + "/**")
    v.goto("/console/oidc/callback?error=access_denied&error_description=User+said+no")
    assert v.page.inner_text("#error") == "The identity provider did not sign you in: User said no."
    assert "bastion_session" not in {c["name"] for c in v.context.cookies()}


def test_sign_out_revokes_the_idp_session(
    visit: Visit, idp_gateway: tuple[Gateway, OidcProvider]
) -> None:
    gw, _ = idp_gateway
    v = visit()
    _sign_in(v, "dora")
    token = next(c["value"] for c in v.context.cookies() if c["name"] == "bastion_session")
    with httpx.Client(base_url=gw.url) as http:
        mine = http.get("/auth/keys", headers={"authorization": f"Bearer {token}"})
        assert mine.status_code == 200  # the console session is a session like `bastion login`'s
        with v.page.expect_navigation():
            v.page.click("#sign-out")
        assert v.page.url == v.base + "/console/login"
        again = http.get("/auth/keys", headers={"authorization": f"Bearer {token}"})
        assert again.status_code == 401 and again.json()["error"]["code"] == "session_revoked"
    db = sa.create_engine(str(gw.config["database"]["url"]))
    try:
        with db.connect() as conn:
            rows = conn.execute(sa.select(sessions).where(sessions.c.user == "dora")).all()
    finally:
        db.dispose()
    assert any(r.revoked_at is not None and r.revoked_by == "dora" for r in rows)


def test_a_team_admin_mints_a_team_key_and_revokes_a_members_key(
    visit: Visit, idp_gateway: tuple[Gateway, OidcProvider]
) -> None:
    gw, _ = idp_gateway
    member = visit()
    _sign_in(member, "dora")
    member.goto("/console/keys")
    member.page.fill("#key-name", "dora-notebook")
    member.page.click("#mint")
    dora_key = member.page.inner_text("#new-key")
    assert dora_key.startswith("bst-")
    # A member has no team form, and posting to it answers 404.
    assert member.page.locator("#team-mint-form").count() == 0
    posted = member.context.request.post(
        member.base + "/console/keys/team", form={"name": "sneaky"}, max_redirects=0
    )
    assert posted.status == 404

    admin = visit()
    _sign_in(admin, "emil")
    admin.goto("/console/keys")
    admin.page.fill("#team-key-name", "nightly-batch")
    admin.page.fill("#team-key-days", "30")
    admin.page.click("#team-mint")
    team_key = admin.page.inner_text("#new-key")
    assert team_key.startswith("bst-")
    # Attributing a key to another person is the admin API's refusal, shown as it says it.
    admin.page.fill("#team-key-name", "for-dora")
    admin.page.fill("#team-key-user", "dora")
    admin.page.click("#team-mint")
    assert "only to themselves or to no one" in admin.page.inner_text("#error")
    # Dora's key is among the team's keys the team-admin manages; revoking it works.
    row = admin.page.locator("tr", has_text="dora-notebook")
    assert row.count() == 1
    with admin.page.expect_navigation():
        row.locator("button.revoke").click()
    with httpx.Client(base_url=gw.url) as http:
        models = http.get("/v1/models", headers={"authorization": f"Bearer {dora_key}"})
        assert models.status_code == 401
        assert http.get("/v1/models", headers={"authorization": f"Bearer {team_key}"}).is_success
    docs = _audit_actions(gw)
    assert ("emil", "key.create") in docs and ("emil", "key.revoke") in docs
    assert not admin.errors and not member.errors


def _audit_actions(gw: Gateway) -> set[tuple[str, str]]:
    db = sa.create_engine(str(gw.config["database"]["url"]))
    deadline = time.monotonic() + 15
    try:
        while True:
            with db.connect() as conn:
                docs = [orjson.loads(d) for (d,) in conn.execute(sa.select(audit_entries.c.doc))]
            got = {(str(d.get("actor")), str(d.get("action"))) for d in docs}
            if ("emil", "key.revoke") in got or time.monotonic() > deadline:
                return got
            time.sleep(0.2)
    finally:
        db.dispose()
