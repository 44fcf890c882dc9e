"""Settings of `prices:`: the price book usage records and budgets are costed with."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from bastion.core.settings import Strict, section


class PriceSettings(Strict):
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
    prompt: float = Field(0.0, ge=0, description="Price per 1M uncached prompt tokens.")
    cached_prompt: float | None = Field(
        None, ge=0, description="Price per 1M cached prompt tokens (default: prompt price)."
    )
    completion: float = Field(0.0, ge=0, description="Price per 1M completion tokens.")


def _known_models(settings: Any) -> list[str]:
    return [f"prices.{m}: unknown model {m!r}" for m in settings.prices if m not in settings.models]


section(
    "prices",
    dict[str, PriceSettings],
    "Price book per model alias (per 1M tokens).",
    default_factory=dict,
    check=_known_models,
)
