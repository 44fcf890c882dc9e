"""Settings of `prices:` (the price book usage records and budgets are costed with) and
`metering:` (the default currency).

Prices are exact decimals; every amount derived from them is an integer number of micro-units
(millionths of the currency). A budget only counts amounts in its own currency, so a caller
with a budget must not reach a model that has no price, or a price in another currency: the
configuration is refused at start (`_budgets_priced`), and the admission refuses such a request
at run time (budgets set through the admin API are not in the file).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import Field

from bastion.core.settings import CURRENCY, LimitSettings, Strict, section

Price = Decimal


class PriceSettings(Strict):
    currency: str | None = Field(
        None, pattern=CURRENCY, description="ISO 4217 code (default: `metering.currency`)."
    )
    prompt: Price = Field(
        Decimal(0), ge=0, allow_inf_nan=False, description="Price per 1M uncached prompt tokens."
    )
    cached_prompt: Price | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Price per 1M cached prompt tokens (default: prompt price).",
    )
    completion: Price = Field(
        Decimal(0), ge=0, allow_inf_nan=False, description="Price per 1M completion tokens."
    )


class MeteringSettings(Strict):
    currency: str = Field(
        "USD",
        pattern=CURRENCY,
        description="The currency of prices and budgets that name none (ISO 4217).",
    )


def resolved_prices(settings: Any) -> dict[str, PriceSettings]:
    """The price book with every entry's currency filled in."""
    default = settings.metering.currency
    return {
        m: p if p.currency else p.model_copy(update={"currency": default})
        for m, p in settings.prices.items()
    }


def budget_currency(settings: Any, limits: LimitSettings) -> str:
    return limits.currency or settings.metering.currency


def unpriced(settings: Any, model: str, currency: str) -> str | None:
    """Why `model` cannot be charged to a budget in `currency`, or None when it can."""
    price = settings.prices.get(model)
    if price is None:
        return f"has no price (prices.{model})"
    if (price.currency or settings.metering.currency) != currency:
        return f"is priced in {price.currency or settings.metering.currency}"
    return None


def _budgeted_levels(settings: Any) -> list[tuple[str, LimitSettings, list[str]]]:
    """(where, limits, models its callers can reach) for every budget in the file."""
    every = list(settings.models)
    defaults = settings.limits.defaults
    # Defaults apply to keys, users, teams and cost centers created later through the API
    # too, which may be given any model.
    out = [
        (f"limits.defaults.{n}", getattr(defaults, n), every) for n in type(defaults).model_fields
    ]
    for name, team in settings.teams.items():
        reach = [m for m in (team.models or every) if m in settings.models]
        if team.limits is not None:
            out.append((f"teams.{name}.limits", team.limits, reach))
        for m, lim in team.model_limits.items():
            out.append((f"teams.{name}.model_limits.{m}", lim, [m]))
    for name, cc in settings.cost_centers.items():
        if cc.limits is not None:
            reach = sorted(
                {
                    m
                    for t in settings.teams.values()
                    if t.cost_center == name
                    for m in (t.models or every)
                }
            )
            out.append((f"cost_centers.{name}.limits", cc.limits, reach))
    for m, model in settings.models.items():
        out.append((f"models.{m}.limits", model.limits, [m]))
    return [(where, lim, reach) for where, lim, reach in out if lim.has_budget()]


def _budgets_priced(settings: Any) -> list[str]:
    errors = [
        f"prices.{m}: unknown model {m!r}" for m in settings.prices if m not in settings.models
    ]
    for where, limits, reach in _budgeted_levels(settings):
        currency = budget_currency(settings, limits)
        for m in reach:
            if m in settings.models and (why := unpriced(settings, m, currency)):
                errors.append(
                    f"{where}: a budget in {currency}, but its callers can reach model '{m}', "
                    f"which {why}: that spend would escape the budget (price the model in "
                    f"{currency}, or take it away)"
                )
    return errors


section(
    "prices",
    dict[str, PriceSettings],
    "Price book per model alias (per 1M tokens, exact decimals).",
    default_factory=dict,
    check=_budgets_priced,
)
section("metering", MeteringSettings, "How usage is costed.")
