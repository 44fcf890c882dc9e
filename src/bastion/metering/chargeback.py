"""`bastion report chargeback`: a month of usage as FinOps FOCUS cost rows, one per cost center
x team x model x day (UTC) x currency, read from the hourly rollups.

Column names are FOCUS 1.x's (present since 1.0); Bastion's own extra columns carry the `x_`
prefix FOCUS reserves for custom columns. Money is the price book's cost summed in integer
micro-units and written as an exact decimal string (never a float, in JSON too), so the rows
add up to the usage records to the micro-unit. Internal chargeback has no discounts or
commitments: ListCost = ContractedCost = EffectiveCost = BilledCost.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import Engine

from bastion.metering.rollups import aggregate, month_range
from bastion.metering.usage import money

SERVICE = "Bastion LLM Gateway"
#: The FOCUS columns written, in order (then the `x_` ones).
FOCUS_COLUMNS = (
    "BillingAccountId", "BillingAccountName", "SubAccountId", "SubAccountName",
    "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd",
    "ChargeCategory", "ChargeClass", "ChargeFrequency", "ChargeDescription",
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
    "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit", "PricingCategory",
    "ResourceId", "ResourceName", "ResourceType", "ServiceName", "ServiceCategory",
    "ProviderName", "PublisherName", "InvoiceIssuerName", "Tags",
)  # fmt: skip
EXTRA_COLUMNS = (
    "x_Requests", "x_Errors", "x_PromptTokens", "x_CachedPromptTokens", "x_CompletionTokens",
    "x_Priced",
)  # fmt: skip


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def chargeback(engine: Engine, month: str, default_currency: str) -> list[dict[str, Any]]:
    """The FOCUS rows of `month` ('YYYY-MM'). Usage of a model without a price has no currency
    in its records: it is listed at cost 0 in `default_currency` with `x_Priced` false, so
    the volume is visible without inventing an amount."""
    start, end = month_range(month)
    period_start, period_end = _iso(start), _iso(end)
    rows = aggregate(engine, ["cost-center", "team", "model"], start, end, step="day")
    out = []
    days: dict[str, tuple[str, str]] = {}  # a period's ISO bounds, formatted once a day
    for r in rows:
        bounds = days.get(r["period"])
        if bounds is None:
            day = datetime.fromisoformat(r["period"]).replace(tzinfo=start.tzinfo)
            bounds = days[r["period"]] = (_iso(day), _iso(day + timedelta(days=1)))
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        cost = money(r["cost_micros"])
        cc, team, model = r["cost-center"] or "", r["team"] or "", r["model"] or ""
        out.append(
            {
                "BillingAccountId": cc,
                "BillingAccountName": cc,
                "SubAccountId": team,
                "SubAccountName": team,
                "BillingPeriodStart": period_start,
                "BillingPeriodEnd": period_end,
                "ChargePeriodStart": bounds[0],
                "ChargePeriodEnd": bounds[1],
                "ChargeCategory": "Usage",
                "ChargeClass": None,
                "ChargeFrequency": "Usage-Based",
                "ChargeDescription": (
                    f"{model or 'unknown model'}: {r['requests']} requests, "
                    f"{r['prompt_tokens']} prompt ({r['cached_tokens']} cached) + "
                    f"{r['completion_tokens']} completion tokens"
                ),
                "BilledCost": cost,
                "EffectiveCost": cost,
                "ListCost": cost,
                "ContractedCost": cost,
                "BillingCurrency": r["currency"] or default_currency,
                "ConsumedQuantity": tokens,
                "ConsumedUnit": "Tokens",
                # The price book is per 1M tokens: the same volume in that unit, exactly.
                "PricingQuantity": format(Decimal(tokens).scaleb(-6), "f"),
                "PricingUnit": "1M Tokens",
                "PricingCategory": "Standard",
                "ResourceId": f"bastion/model/{model}",
                "ResourceName": model,
                "ResourceType": "Model alias",
                "ServiceName": SERVICE,
                "ServiceCategory": "AI and Machine Learning",
                "ProviderName": "Bastion",
                "PublisherName": "Bastion",
                "InvoiceIssuerName": "Bastion",
                "Tags": {"team": team, "cost_center": cc},
                "x_Requests": r["requests"],
                "x_Errors": r["errors"],
                "x_PromptTokens": r["prompt_tokens"],
                "x_CachedPromptTokens": r["cached_tokens"],
                "x_CompletionTokens": r["completion_tokens"],
                "x_Priced": r["currency"] is not None,
            }
        )
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, str]:
    """BilledCost per BillingCurrency, summed exactly (for the report's footer and tests)."""
    acc: dict[str, Decimal] = {}
    for r in rows:
        c = r["BillingCurrency"]
        acc[c] = acc.get(c, Decimal(0)) + Decimal(r["BilledCost"])
    return {c: format(v.quantize(Decimal("0.000001")), "f") for c, v in sorted(acc.items())}


def render(rows: list[dict[str, Any]], fmt: Literal["csv", "json"]) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*FOCUS_COLUMNS, *EXTRA_COLUMNS], lineterminator="\n")
    w.writeheader()
    for r in rows:
        # Tags is a JSON object in a CSV cell (FOCUS's key-value format); booleans lower-case.
        w.writerow(
            {
                **r,
                "Tags": orjson.dumps(r["Tags"], option=orjson.OPT_SORT_KEYS).decode(),
                "x_Priced": "true" if r["x_Priced"] else "false",
                "ChargeClass": r["ChargeClass"] or "",
            }
        )
    return buf.getvalue()
