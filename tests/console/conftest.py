"""Fixtures for the console tests: a real gateway in front of the real engines with directory
sign-in against the real slapd, and Debian's Chromium driven by Playwright.

Playwright's own browser download cannot work offline, so the browser is the distribution's
`/usr/bin/chromium` (installed by `scripts/install.sh --dev`), launched with the flags that keep
it from reaching for Google's services on a closed network.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from bastion.local.launcher import VllmProcess
from tests.conftest import Gateway, base_config, engine_models
from tests.identity.slapd import PASSWORDS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots for docs/console.md, taken by the tests themselves: into docs/console/ when
#: BASTION_DOCS_SCREENSHOTS=1 (to refresh the docs), else into a scratch folder, so that a test
#: run never leaves the checkout modified.
SHOTS = (
    Path(__file__).resolve().parent.parent.parent / "docs" / "console"
    if os.environ.get("BASTION_DOCS_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="bastion-console-shots-"))
)
#: slapd's users and the team and role the console gateway maps them to.
ROLES = {
    "alice": ("alpha", "member"),  # payments-devs, nested in all-engineering
    "bob": ("beta", "team-admin"),  # risk-analysts
    "carol": ("beta", "auditor"),  # bastion-auditors
}


@pytest.fixture(scope="module")
def console_gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    slapd: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    db = tmp_path_factory.mktemp("console") / "b.db"
    cfg = base_config(
        f"sqlite:///{db}",
        engine_models(chat_engine, embed_engine),
        prices={
            "tiny": {"prompt": 1.0, "cached_prompt": 0.5, "completion": 2.0},
            "minilm": {"prompt": 0.1},
        },
        limits={"defaults": {"team": {"budget_month": "50"}}},
    )
    cfg["identity"].update(
        {
            "ldap": slapd.ldap_settings(),
            "group_mappings": [
                {"group": "bastion-auditors", "team": "beta", "role": "auditor"},
                {"group": "risk-analysts", "team": "beta", "role": "team-admin"},
                {"group": "all-engineering", "team": "alpha"},
            ],
        }
    )
    gw = make_gateway(cfg)
    gw.wait_ready()
    return gw


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Visitor:
    """A browser context of its own (cookies, storage) and the console errors it saw."""

    context: BrowserContext
    page: Page
    base: str
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def sign_in(self, user: str, password: str | None = None) -> Any:
        self.goto("/console/login")
        self.page.fill("#username", user)
        self.page.fill("#password", PASSWORDS[user] if password is None else password)
        with self.page.expect_navigation():
            self.page.click("#sign-in")
        return self.page


@contextlib.contextmanager
def visitors(
    browser: Browser, url: str, console_errors: bool = True, **context: Any
) -> Iterator[Callable[[], Visitor]]:
    """Makes browser visitors of the gateway at `url`, each in a context of its own, closed at
    the end. Script errors are collected in `errors` (console messages too, unless a page of
    another site, such as an IdP's, is visited)."""
    made: list[Visitor] = []

    def make() -> Visitor:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900}, **context)
        page = ctx.new_page()
        v = Visitor(ctx, page, url)
        if console_errors:
            page.on("console", lambda m: v.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: v.errors.append(str(e)))
        made.append(v)
        return v

    try:
        yield make
    finally:
        for v in made:
            v.context.close()


@pytest.fixture
def visit(browser: Browser, console_gateway: Gateway) -> Iterator[Callable[[], Visitor]]:
    with visitors(browser, console_gateway.url) as make:
        yield make
