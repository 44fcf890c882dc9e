"""The web console end to end: real Chromium (Debian's, driven by Playwright) against a real
`bastion serve`, directory sign-in through a real slapd, real vLLM engines behind it.

Checks: signing in and out; a member mints a key in the browser and calls a model with it via
the `openai` SDK, then revokes it; each role sees its pages and gets 404 for the others;
charts draw the data of real traffic (points counted in uPlot's own state and in the JSON
endpoint, not in pixels); the CSP and cookie flags; no console errors; a POST without the
CSRF token is refused. The screenshots in docs/console/ are taken here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa

from bastion.console.security import CSP
from bastion.identity.keys import hash_key
from bastion.store.schema import api_keys, audit_entries
from tests.conftest import Gateway, usage_rows
from tests.console.conftest import SHOTS, Visitor

pytestmark = pytest.mark.engine
Visit = Callable[[], Visitor]


def _chat(gw: Gateway, key: str, n: int = 1, stream: bool = False) -> list[str]:
    ids = []
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60) as c:
        for _ in range(n):
            raw = c.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                stream=stream,
            )  # fmt: skip
            if stream:
                list(raw.parse())  # read to the end: the usage record is written then
            ids.append(raw.headers["x-request-id"])
    return ids


def _audit_docs(gw: Gateway) -> list[dict[str, Any]]:
    db = sa.create_engine(str(gw.config["database"]["url"]))
    try:
        with db.connect() as conn:
            return [orjson.loads(d) for (d,) in conn.execute(sa.select(audit_entries.c.doc))]
    finally:
        db.dispose()


def _audited(gw: Gateway, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The audit entries `match` accepts, waiting for the trail's writer to store them (an
    entry is durable in the trail's log first, in the database a moment later)."""
    deadline = time.monotonic() + 15
    while True:
        found = [d for d in _audit_docs(gw) if match(d)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _key_id(gw: Gateway, token: str) -> str:
    db = sa.create_engine(str(gw.config["database"]["url"]))
    try:
        with db.connect() as conn:
            q = sa.select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(token))
            return str(conn.execute(q).scalar_one())
    finally:
        db.dispose()


def test_sign_in_through_the_directory_and_out(visit: Visit, console_gateway: Gateway) -> None:
    v = visit()
    first = v.goto("/console/")
    assert v.page.url.endswith("/console/login")  # not signed in: to the sign-in form
    assert first.headers["content-security-policy"] == CSP
    v.page.screenshot(path=str(SHOTS / "login.png"))
    v.sign_in("alice", "wrong password")
    assert "Invalid username or password" in v.page.inner_text("#error")
    v.sign_in("alice")
    assert v.page.url.endswith("/console/")
    assert v.page.inner_text("#whoami") == "alice · alpha · member"
    cookies = {c["name"]: c for c in v.context.cookies()}
    session = cookies["bastion_session"]
    assert session["value"].startswith("bss-")
    assert (session["httpOnly"], session["secure"], session["sameSite"]) == (True, True, "Strict")
    assert session["path"] == "/console"
    with v.page.expect_navigation():
        v.page.click("#sign-out")
    assert v.page.url.endswith("/console/login")
    # The session is ended on the server, not only forgotten by the browser.
    r = httpx.get(console_gateway.url + "/auth/keys",
                  headers={"authorization": f"Bearer {session['value']}"})  # fmt: skip
    assert r.status_code == 401 and r.json()["error"]["code"] == "session_revoked"
    for action in ("login.failed", "login"):
        assert _audited(console_gateway, lambda d, a=action: (d.get("actor"), d.get("action"))
                        == ("alice", a))  # fmt: skip
    # The one error: the browser's note of the wrong password's 401, nothing from the pages.
    assert v.errors == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]


def test_member_mints_a_key_in_the_browser_and_uses_it(
    visit: Visit, console_gateway: Gateway
) -> None:
    v = visit()
    v.sign_in("alice")
    v.goto("/console/keys")
    v.page.fill("#key-name", "notebook")
    v.page.fill("#key-days", "30")
    with v.page.expect_navigation():
        v.page.click("#mint")
    key = v.page.inner_text("#new-key").strip()
    assert key.startswith("bst-")
    (rid,) = _chat(console_gateway, key)
    (row,) = usage_rows(str(console_gateway.config["database"]["url"]), request_id=rid)
    assert (row.user, row.team) == ("alice", "alpha")
    created = _audited(
        console_gateway,
        lambda d: (
            d.get("action") == "key.create"
            and d.get("actor") == "alice"
            and d["after"]["name"] == "notebook"
        ),
    )
    assert len(created) == 1
    key_id = created[0]["after"]["id"]
    assert v.page.inner_text(f"#row-{key_id} .status") == "active"
    v.page.screenshot(
        path=str(SHOTS / "keys.png"), full_page=True, mask=[v.page.locator("#new-key")]
    )
    with v.page.expect_navigation():
        v.page.click(f"#revoke-{key_id}")
    assert v.page.inner_text(f"#row-{key_id} .status") == "revoked"
    with pytest.raises(openai.AuthenticationError):
        _chat(console_gateway, key)
    assert v.errors == []


def test_a_team_admin_revokes_a_member_key_of_the_team(
    visit: Visit, console_gateway: Gateway
) -> None:
    ours = console_gateway.create_key("beta", "--user", "zed")
    theirs = console_gateway.create_key("alpha", "--user", "yan")
    v = visit()
    v.sign_in("bob")
    v.goto("/console/keys")
    listed = v.page.locator("table.keys").nth(1).inner_text()
    assert ours[:12] in listed and theirs[:12] not in listed  # another team's key: not there
    row = v.page.locator("table.keys tr", has_text=ours[:12])
    with v.page.expect_navigation():
        row.locator("button.revoke").click()
    assert v.page.locator("table.keys tr", has_text=ours[:12]).locator(".status").inner_text() == (
        "revoked"
    )
    with pytest.raises(openai.AuthenticationError):
        _chat(console_gateway, ours)
    assert _audited(
        console_gateway,
        lambda d: (
            d.get("action") == "key.revoke"
            and d.get("actor") == "bob"
            and d["before"]["user"] == "zed"
        ),
    )
    # Another team's key, posted by hand with a valid token: 404, as the admin API answers.
    csrf = v.page.get_attribute("#mint-form input[name=csrf]", "value")
    r = v.context.request.post(
        console_gateway.url + f"/console/keys/{_key_id(console_gateway, theirs)}/revoke",
        form={"csrf": csrf},
    )
    assert r.status == 404
    assert v.errors == []


def test_each_role_sees_its_pages_and_404_for_the_rest(
    visit: Visit, console_gateway: Gateway
) -> None:
    expected = {
        "alice": {"": 200, "keys": 200, "usage": 404, "models": 404, "limits": 404, "audit": 404},
        "bob": {"": 200, "keys": 200, "usage": 200, "models": 200, "limits": 200, "audit": 404},
        "carol": {"": 200, "keys": 404, "usage": 200, "models": 404, "limits": 404, "audit": 200},
    }
    # The finance pages (tests/console/test_finance.py): admins and auditors only.
    for user, status in (("alice", 404), ("bob", 404), ("carol", 200)):
        expected[user].update({"chargeback": status, "cost-case": status})
    for user, pages in expected.items():
        v = visit()
        v.sign_in(user)
        nav = {a.get_attribute("id") for a in v.page.locator("header nav a").all()}
        shown = {f"nav-{p or 'overview'}" for p, status in pages.items() if status == 200}
        assert nav == shown, user
        for path, status in pages.items():
            response = v.goto(f"/console/{path}")
            assert response.status == status, (user, path)
            assert response.headers["content-security-policy"] == CSP
        assert v.errors == [] or all("404" in e for e in v.errors), v.errors
    assert v.goto("/console/no-such-page").status == 404
    assert v.goto("/console").url.endswith("/console/")  # redirected into the console
    # The JSON behind a page follows the page's roles.
    v = visit()
    v.sign_in("alice")
    assert v.context.request.get(console_gateway.url + "/console/api/burn-down").status == 404
    assert v.context.request.get(console_gateway.url + "/console/api/overview").status == 200
    anonymous = httpx.get(console_gateway.url + "/console/api/overview")
    assert anonymous.status_code == 401


def test_models_page_shows_the_deployments(visit: Visit, console_gateway: Gateway) -> None:
    v = visit()
    v.sign_in("bob")
    v.goto("/console/models")
    rows = v.page.locator("#models-table tbody tr").all_inner_texts()
    assert any(r.startswith("tiny") and "up" in r for r in rows), rows
    assert any(r.startswith("minilm") for r in rows), rows
    # htmx refreshes the table from /console/models/table without a page load.
    with v.page.expect_response(lambda r: r.url.endswith("/console/models/table"), timeout=15000):
        pass
    v.page.screenshot(path=str(SHOTS / "models.png"), full_page=True)
    assert v.errors == []


def test_charts_draw_real_traffic(visit: Visit, console_gateway: Gateway) -> None:
    key = console_gateway.create_key("beta", "--user", "bob-app")
    sent = 7  # 5 answered whole, 2 streamed (only those have a time to first token)
    ids = _chat(console_gateway, key, 5) + _chat(console_gateway, key, 2, stream=True)
    usage_rows(str(console_gateway.config["database"]["url"]), request_id=ids[-1])
    time.sleep(0.2)
    v = visit()
    v.sign_in("bob")  # team-admin of beta: sees beta's traffic only
    v.goto("/console/?window=1h")
    v.page.wait_for_selector(".charts[data-loaded=true]")
    drawn = v.page.evaluate(
        """() => Object.fromEntries(Object.entries(window.bastionCharts).map(([m, u]) => [m, {
             labels: u.series.slice(1).map(s => s.label),
             points: u.data.slice(1).map(ys => ys.filter(y => y !== null && y !== undefined)),
             xs: u.data[0].length }]))"""
    )
    assert drawn["requests"]["labels"] == ["tiny"]
    assert sum(drawn["requests"]["points"][0]) == sent
    assert drawn["requests"]["xs"] == 60  # one point a minute for the hour
    assert len(drawn["latency_p95"]["points"][0]) >= 1
    assert all(p > 0 for p in drawn["latency_p95"]["points"][0])
    assert len(drawn["ttft_p95"]["points"][0]) >= 1
    data = v.context.request.get(console_gateway.url + "/console/api/overview?window=1h").json()
    assert data["requests"] == {"tiny": sent}
    assert data["models"] == ["tiny"] and len(data["x"]) == 60
    v.page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)
    # Usage and the budget burn-down, from the same records.
    v.goto("/console/usage?by=key")
    v.page.wait_for_selector(".charts[data-loaded=true]")
    table = v.page.locator("#usage-table tbody tr").all_inner_texts()
    assert len(table) == 1 and f"\t{sent}\t" in table[0], table
    burn = v.page.evaluate("() => window.bastionCharts.spent.series.map(s => s.label)")
    assert burn[1:] == ["spent", "budget"]
    v.page.screenshot(path=str(SHOTS / "usage.png"), full_page=True)
    # Limits: the team's monthly budget (limits.defaults.team), with this traffic's spend.
    v.goto("/console/limits")
    budget = v.page.locator("#limits-table tr", has_text="budget_month").all_inner_texts()
    assert any("beta" in r and "50" in r and "\tok\t" in r for r in budget), budget
    v.page.screenshot(path=str(SHOTS / "limits.png"), full_page=True)
    assert v.errors == []


def test_an_auditor_searches_the_trail_and_the_search_is_recorded(
    visit: Visit, console_gateway: Gateway
) -> None:
    v = visit()
    v.sign_in("carol")
    v.goto("/console/audit")
    assert v.page.locator("#audit-table").count() == 0  # the form alone reads nothing
    v.page.fill("#audit-kind", "auth")
    v.page.fill("#audit-team", "beta")
    with v.page.expect_navigation():
        v.page.click("#audit-search")
    deadline = time.monotonic() + 15
    while True:  # the sign-in's entry reaches the database from the trail's log shortly after
        rows = v.page.locator("#audit-table tbody tr").all_inner_texts()
        if any("\tcarol\tlogin" in r for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
        v.page.reload()  # the same search again, recorded again
    assert rows and all("\tauth\tbeta\t" in r for r in rows), rows
    assert any("\tcarol\tlogin" in r for r in rows), rows
    v.page.screenshot(path=str(SHOTS / "audit.png"), full_page=True)
    found = _audited(
        console_gateway,
        lambda d: (
            d.get("kind") == "read"
            and d.get("actor") == "carol"
            and d["query"].get("kind") == "auth"
        ),
    )
    assert found and found[0]["action"] == "search" and found[0]["query"]["team"] == "beta"
    bad = v.goto("/console/audit?since=garbage")
    assert bad.status == 400 and "not a time" in v.page.inner_text("#error")


def test_a_post_without_the_csrf_token_is_refused(visit: Visit, console_gateway: Gateway) -> None:
    v = visit()
    v.sign_in("alice")
    api = v.context.request  # the signed-in browser's cookies, no form token
    base = console_gateway.url
    for form in ({"name": "forged"}, {"name": "forged", "csrf": "0" * 64}):
        r = api.post(base + "/console/keys", form=form)
        assert r.status == 403 and "security token" in r.text()
    assert api.post(base + "/console/logout", form={}).status == 403
    assert v.goto("/console/").status == 200  # still signed in: the forged sign-out did nothing
    # A token from another browser's nonce does not work either.
    other = visit()
    other.goto("/console/login")
    foreign = other.page.get_attribute("input[name=csrf]", "value")
    assert api.post(base + "/console/keys", form={"name": "x", "csrf": foreign}).status == 403
    # Sign-in itself needs the token (login CSRF).
    r = httpx.post(base + "/console/login", data={"username": "alice", "password": "x"})
    assert r.status_code == 403
    keys = v.context.request.get(base + "/auth/keys")
    assert keys.status == 401  # the session cookie is scoped to /console: the API ignores it
    assert not any(d.get("after", {}).get("name") == "forged" for d in _audit_docs(console_gateway))
