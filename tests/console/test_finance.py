"""The console's finance pages end to end: real Chromium against a real `bastion serve` with
directory sign-in through the real slapd (no engines: these pages read usage, and October's is
written straight into the gateway's database by the usage writer's own `write_batch`).

Checks: the Chargeback page sums the FOCUS rows per cost center x team x model and reconciles
to the CLI; its CSV and JSON downloads are byte-identical to `bastion report chargeback`; the
month picker and a bad month; the Cost case page shows `bastion report tco`'s numbers, says
when self-hosting is dearer, and its charts draw the JSON endpoint's points (counted in
uPlot's own state); team-admins get 404; no console errors.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser

from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, write_batch
from bastion.store.db import make_engine
from tests.conftest import Gateway, base_config
from tests.console.conftest import SHOTS, Visitor, visitors
from tests.metering.test_tco import OWNED, VENDOR

MONTH = "2026-10"
PRICE = PriceSettings(currency="USD", prompt=1.0, cached_prompt=0.5, completion=2.0)
DEAD = "http://127.0.0.1:9/v1"  # no engine: nothing here calls a model
LEASED: dict[str, Any] = {
    "gpus": 1,
    "leased": {"price_per_gpu_hour": "0.50"},
    "throughput_tokens_per_second": 5000,
    "utilisation": "0.5",
    "vendor_model": "big-1",
}


def _records() -> list[dict[str, Any]]:
    """October: tiny at a low volume (self-hosting dearer), heavy at a high one (cheaper)."""
    out, t0 = [], datetime(2026, 10, 1, tzinfo=UTC)
    plan = [  # team, user, model, prompt, completion, count
        ("alpha", "alice", "tiny", 1_000_000, 200_000, 40),
        ("beta", "bob", "tiny", 500_000, 100_000, 20),
        ("beta", "bob", "heavy", 10_000_000, 5_000_000, 30),
    ]
    for team, user, model, prompt, completion, n in plan:
        for i in range(n):
            r = UsageRecord(
                request_id=f"{team}-{model}-{i}", endpoint="chat", team=team,
                cost_center={"alpha": "cc-1", "beta": "cc-2"}[team], user=user, model=model,
                prompt_tokens=prompt, completion_tokens=completion,
                outcome="ok" if i % 10 else "upstream_error", latency_ms=120.0, ttft_ms=40.0,
                ts=t0 + timedelta(hours=7 * i + 3, minutes=i),
            )  # fmt: skip
            r.price(PRICE if model == "tiny" else None)
            out.append({f: getattr(r, f) for f in UsageRecord.__slots__})
    return out


@pytest.fixture(scope="module")
def finance_gateway(
    make_gateway: Callable[..., Gateway], slapd: Any, tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    db = tmp_path_factory.mktemp("finance") / "b.db"
    dead = {"deployments": [{"url": DEAD, "served_name": "x"}]}
    cfg = base_config(
        f"sqlite:///{db}",
        {"tiny": dead, "heavy": dead},
        prices={"tiny": {"prompt": 1.0, "completion": 2.0}},
        tco={"models": {"tiny": OWNED, "heavy": LEASED}, "vendor": VENDOR},
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
    gw = make_gateway(cfg)  # started (it migrated the database) once /healthz answers
    engine = make_engine(cfg["database"]["url"])
    write_batch(engine, _records())
    engine.dispose()
    return gw


@pytest.fixture
def visit(browser: Browser, finance_gateway: Gateway) -> Iterator[Callable[[], Visitor]]:
    with visitors(browser, finance_gateway.url, accept_downloads=True) as make:
        yield make


def _download(v: Visitor, selector: str, tmp_path: Path) -> bytes:
    with v.page.expect_download() as info:
        v.page.click(selector)
    target = tmp_path / info.value.suggested_filename
    info.value.save_as(target)
    return target.read_bytes()


def test_chargeback_page_and_downloads_equal_the_cli(
    visit: Callable[[], Visitor], finance_gateway: Gateway, tmp_path: Path
) -> None:
    v = visit()
    v.sign_in("carol")  # an auditor: finance reads as an auditor
    assert v.page.is_visible("#nav-chargeback") and v.page.is_visible("#nav-cost-case")
    v.goto(f"/console/chargeback?month={MONTH}")
    rows = v.page.locator("#chargeback-table tbody tr")
    assert rows.count() == 3  # cc-1/alpha/tiny, cc-2/beta/tiny, cc-2/beta/heavy
    cli = finance_gateway.cli("report", "chargeback", "--month", MONTH, "--format", "json")
    focus = json.loads(cli.stdout)
    total = sum(Decimal(r["BilledCost"]) for r in focus)
    # tiny: 60 requests priced (40 x 1.4 + 20 x 0.7 USD); heavy is unpriced (0, x_Priced false).
    assert total == Decimal("70.000000")
    assert v.page.inner_text("#total-USD") == "70.000000 USD"
    # Each summary row is the CLI's day rows of its cost center, team and model, summed.
    cli_groups: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    for r in focus:
        key = (r["BillingAccountId"], r["SubAccountId"], r["ResourceName"])
        cli_groups[key] += Decimal(r["BilledCost"])
    cells = v.page.eval_on_selector_all(
        "#chargeback-table tbody tr",
        "trs => trs.map(tr => Array.from(tr.cells).map(td => td.innerText))",
    )
    page_groups = {(c[0], c[1], c[2]): Decimal(c[6].split()[0]) for c in cells}
    assert page_groups == cli_groups
    v.page.screenshot(path=str(SHOTS / "chargeback.png"), full_page=True)
    heavy = v.page.locator("#chargeback-table tbody tr", has_text="heavy").inner_text()
    assert "30" in heavy and "(unpriced)" in heavy and "cc-2" in heavy
    csv_bytes = _download(v, "#download-csv", tmp_path)
    assert (
        csv_bytes.decode() == finance_gateway.cli("report", "chargeback", "--month", MONTH).stdout
    )
    assert csv_bytes.startswith(b"BillingAccountId,")
    json_bytes = _download(v, "#download-json", tmp_path)
    assert json_bytes.decode() == cli.stdout
    # The month picker, and a month without usage.
    v.page.fill("#month", "2026-09")
    with v.page.expect_navigation():
        v.page.click("#show-month")
    assert v.page.url.endswith("/console/chargeback?month=2026-09")
    assert "No usage in 2026-09" in v.page.inner_text("#chargeback-table")
    # A bad month is a clear 400, on the page and the download.
    bad = v.goto("/console/chargeback?month=2026-13")
    assert bad.status == 400 and "not a month" in v.page.inner_text("main")
    got = v.page.request.get(finance_gateway.url + "/console/chargeback/download?format=xls")
    assert got.status == 400
    assert v.errors == [] or all("400" in e for e in v.errors), v.errors


def test_cost_case_page_charts_and_honesty(
    visit: Callable[[], Visitor], finance_gateway: Gateway
) -> None:
    v = visit()
    v.sign_in("carol")
    v.goto(f"/console/cost-case?month={MONTH}")
    v.page.wait_for_selector(".charts[data-loaded='true']", timeout=10_000)
    report = json.loads(
        finance_gateway.cli("report", "tco", "--month", MONTH, "--format", "json").stdout
    )
    by_model = {r["model"]: r for r in report}
    table = v.page.locator("#tco-table tbody tr")
    assert table.count() == 2
    heavy, tiny = table.nth(0).inner_text(), table.nth(1).inner_text()
    assert by_model["tiny"]["self_cost"] in tiny and by_model["tiny"]["vendor_cost"] in tiny
    assert by_model["tiny"]["savings"].startswith("-")  # dearer, and the page says so
    assert "self-hosting costs more" in tiny
    assert "self-hosting is cheaper" in heavy and by_model["heavy"]["savings"] in heavy
    data = v.page.request.get(finance_gateway.url + f"/console/api/cost-case?month={MONTH}").json()
    assert data["models"] == ["heavy", "tiny"] and len(data["self_cost"]) == 2
    drawn = v.page.evaluate(
        "() => Object.fromEntries(Object.entries(window.bastionCharts)"
        ".map(([k, u]) => [k, u.data.map(s => s.length)]))"
    )
    assert drawn["compare"] == [2, 2, 2]  # x (the models), self-hosted, vendor
    assert drawn["curve:tiny"] == drawn["curve:heavy"] == [21, 21, 21]
    tiny_curve = data["curves"]["tiny"]
    # Flat capacity; the vendor's line crosses it at the break-even utilisation.
    assert len(set(tiny_curve["self"])) == 1 and tiny_curve["vendor"][0] == 0
    assert tiny_curve["break_even"] > tiny_curve["utilisation"] > 0
    assert tiny_curve["break_even"] == pytest.approx(
        float(Decimal(by_model["tiny"]["break_even_utilisation"]) * 100), abs=0.01
    )
    assert tiny_curve["x"][-1] >= 100
    v.page.screenshot(path=str(SHOTS / "cost-case.png"), full_page=True)
    assert v.errors == [], v.errors


def test_overview_says_its_percentiles_are_estimates(visit: Callable[[], Visitor]) -> None:
    v = visit()
    v.sign_in("carol")
    v.goto("/console/?window=30d")
    assert "estimated from histogram buckets" in v.page.inner_text("#approximate-note")
    v.goto("/console/?window=1h")
    assert v.page.locator("#approximate-note").count() == 0


def test_team_admins_do_not_see_finance(
    visit: Callable[[], Visitor], finance_gateway: Gateway
) -> None:
    v = visit()
    v.sign_in("bob")  # a team-admin: chargeback shows every team's spend
    assert v.page.locator("#nav-chargeback").count() == 0
    for path in ["/console/chargeback", "/console/cost-case", "/console/chargeback/download"]:
        assert v.goto(path).status == 404
    assert v.page.request.get(finance_gateway.url + "/console/api/cost-case").status == 404
