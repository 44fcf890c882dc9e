"""The console's finance pages: Chargeback (a month's FOCUS rows, summarised, and the very
files `bastion report chargeback` writes) and Cost case (`bastion report tco` with charts).

Both read whole months from the hourly rollups through the same functions the CLI runs
(`metering.chargeback`, `metering.tco`), so the console and the CLI cannot disagree: a download
is byte-for-byte the CLI's output for the same month. They show every team's spend, so they
are for admins and auditors (a finance reader is given the auditor role), not team-admins.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bastion.core.errors import InvalidRequest
from bastion.identity.principal import Principal
from bastion.metering import chargeback as cb
from bastion.metering import tco
from bastion.metering.rollups import aggregate, month_range
from bastion.metering.tco_settings import tco_currency
from bastion.metering.usage import money

#: Page → roles, merged into the console's PAGES.
FINANCE_PAGES: dict[str, frozenset[str]] = {
    "chargeback": frozenset({"admin", "auditor"}),
    "cost-case": frozenset({"admin", "auditor"}),
}
FINANCE_TITLES = {"chargeback": "Chargeback", "cost-case": "Cost case"}
#: Points on each break-even curve.
CURVE_POINTS = 21


def month_of(request: Request) -> str:
    """The `month` query parameter (default: this UTC month), checked: a clear 400 if bad."""
    month = request.query_params.get("month", "").strip() or datetime.now(UTC).strftime("%Y-%m")
    try:
        month_range(month)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_month") from None
    return month


def _chargeback_rows(request: Request, month: str) -> list[dict[str, Any]]:
    settings = request.app.state.settings
    return cb.chargeback(request.app.state.db, month, settings.metering.currency)


def summary(request: Request, month: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The month's chargeback per cost center x team x model x currency, and the total per
    currency: the same rollup sums as the FOCUS rows, without their split by day (a row per
    group, not per group and day), so the totals reconcile with the CLI's to the micro-unit.
    Unpriced usage is listed at 0 in the default currency, as the FOCUS rows list it."""
    start, end = month_range(month)
    default = request.app.state.settings.metering.currency
    rows = aggregate(request.app.state.db, ["cost-center", "team", "model"], start, end)
    out, totals = [], {}
    for r in rows:
        currency = r["currency"] or default
        totals[currency] = totals.get(currency, 0) + r["cost_micros"]
        out.append(
            {"cost_center": r["cost-center"] or "", "team": r["team"] or "",
             "model": r["model"] or "", "currency": currency, "requests": r["requests"],
             "errors": r["errors"], "tokens": r["prompt_tokens"] + r["completion_tokens"],
             "cost": money(r["cost_micros"]), "priced": r["currency"] is not None}
        )  # fmt: skip
    out.sort(key=lambda r: (r["currency"], -Decimal(r["cost"]), r["cost_center"], r["team"]))
    return out, {c: money(v) for c, v in sorted(totals.items())}


async def chargeback_page(request: Request, who: Principal) -> Response:
    from bastion.console.app import render  # the console's renderer (app imports this module)

    month = month_of(request)
    rows, totals = await asyncio.to_thread(summary, request, month)
    return render(request, "chargeback.html", who, month=month, rows=rows, totals=totals)


async def chargeback_download(request: Request, who: Principal) -> Response:
    """The CLI's file: same rows, same renderer, so byte-identical for the same month."""
    month = month_of(request)
    fmt = request.query_params.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise InvalidRequest(f"unknown format {fmt!r} (csv or json)", code="invalid_format")
    rows = await asyncio.to_thread(_chargeback_rows, request, month)
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    return Response(
        cb.render(rows, fmt),  # type: ignore[arg-type]
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="chargeback-{month}.{fmt}"'},
    )


def cost_case(request: Request, month: str, now: datetime | None = None) -> dict[str, Any]:
    """`bastion report tco`'s rows for `month`, and the charts' data: self-hosted against
    vendor cost per model, and each model's cost against utilisation (the break-even curve).
    Chart numbers are floats (drawing only); the table keeps the report's exact strings."""
    settings, db = request.app.state.settings, request.app.state.db
    try:
        rows = tco.report(db, settings, month, now)
    except ValueError as exc:
        return {"month": month, "problem": str(exc), "rows": [], "models": [], "x": [],
                "self_cost": [], "vendor_cost": [], "curves": {}}  # fmt: skip
    _, _, hours = tco.month_hours(month, now)
    vendor = settings.tco.vendor
    curves = {}
    for r in rows:
        m = settings.tco.models[r["model"]]
        t = tco.Tokens(r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
        curves[r["model"]] = curve(m, vendor.models[m.vendor_model], t, hours)
    return {
        "month": month,
        "problem": None,
        "currency": tco_currency(settings),
        "rows": rows,
        "models": [r["model"] for r in rows],
        "x": list(range(len(rows))),
        "self_cost": [float(r["self_cost"]) for r in rows],
        "vendor_cost": [float(r["vendor_cost"]) for r in rows],
        "curves": curves,
    }


def curve(m: Any, vendor: Any, t: tco.Tokens, hours: Decimal) -> dict[str, Any]:
    """Cost against utilisation (0 to past break-even, at least 100 %) at this month's token
    mix: the capacity costs the same at any utilisation; the vendor's cost grows with volume.
    Empty when the month has no priced tokens to scale (nothing to draw honestly)."""
    r = tco.compare(m, vendor, t, hours)
    if not r["utilisation"] or not r["vendor_cost"]:
        return {"x": [], "self": [], "vendor": [], "utilisation": None, "break_even": None}
    be = r["break_even_utilisation"]
    top = max(Decimal(1), be * Decimal("1.25"))
    xs = [top * i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
    per_unit = r["vendor_cost"] / r["utilisation"]  # vendor cost of 100 % utilisation
    return {
        "x": [float(x * 100) for x in xs],
        "self": [float(r["self_cost"])] * len(xs),
        "vendor": [float(per_unit * x) for x in xs],
        "utilisation": float(r["utilisation"] * 100),
        "break_even": float(be * 100),
    }


async def cost_case_page(request: Request, who: Principal) -> Response:
    from bastion.console.app import render

    month = month_of(request)
    data = await asyncio.to_thread(cost_case, request, month)
    return render(request, "cost_case.html", who, month=month, data=data)


async def api_cost_case(request: Request, who: Principal) -> Response:
    month = month_of(request)
    data = await asyncio.to_thread(cost_case, request, month)
    return JSONResponse(data)
