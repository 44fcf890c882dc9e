"""Settings of `tco:`: the GPU-hour price book of self-hosted models and a vendor's price list
to compare them with (`bastion report tco`, `metering/tco.py`).

Every amount is an exact decimal in `tco.currency`. The vendor's list is typed in by hand with
the date it was read (Bastion never fetches prices: it runs air-gapped, and a comparison must
say which prices it used). There is no currency conversion: the list must be in `tco.currency`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from pydantic import Field, model_validator

from bastion.core.settings import CURRENCY, Strict, section

_MONEY: dict[str, Any] = {"ge": 0, "le": 10**9, "allow_inf_nan": False}


class OwnedGpus(Strict):
    """Hardware the bank bought: amortised over `years`, plus the power it draws."""

    purchase_price: Decimal = Field(
        ..., **_MONEY, description="Price of one GPU with its share of the server, network "
        "and installation.",
    )  # fmt: skip
    years: Decimal = Field(..., gt=0, le=20, description="Amortisation period in years.")
    power_kw: Decimal = Field(
        ..., ge=0, le=100, allow_inf_nan=False,
        description="Power per GPU in kW, its share of the server and cooling (PUE) included.",
    )  # fmt: skip
    price_per_kwh: Decimal = Field(..., **_MONEY, description="Electricity price per kWh.")


class LeasedGpus(Strict):
    price_per_gpu_hour: Decimal = Field(..., **_MONEY, description="Lease price per GPU-hour.")


class TcoModel(Strict):
    """How one model alias is served and paid for (all its deployments together)."""

    gpus: int = Field(..., ge=1, le=100_000, description="GPUs serving the alias.")
    owned: OwnedGpus | None = Field(None, description="Owned hardware (or `leased`).")
    leased: LeasedGpus | None = Field(None, description="Leased GPUs (or `owned`).")
    ops_share: Decimal = Field(
        Decimal(0), ge=0, le=10, allow_inf_nan=False,
        description="Operations (staff, facilities, support) as a share of the GPU-hour cost: "
        "0.2 adds 20 %.",
    )  # fmt: skip
    throughput_tokens_per_second: Decimal = Field(
        ..., gt=0, le=10**9, allow_inf_nan=False,
        description="Measured sustained throughput of all the alias's GPUs together, in "
        "uncached prompt + completion tokens per second (e.g. from `bench/`).",
    )  # fmt: skip
    utilisation: Decimal = Field(
        ..., gt=0, le=1, allow_inf_nan=False,
        description="Planned average share of that throughput in use over a month: the price "
        "per 1M tokens assumes it (the report also shows the month's actual one).",
    )  # fmt: skip
    cached_prompt_ratio: Decimal = Field(
        Decimal(1), ge=0, le=1, allow_inf_nan=False,
        description="What a cached prompt token costs relative to an uncached one (a prefix-"
        "cache hit skips its prefill). 1, the default, assumes no saving.",
    )  # fmt: skip
    vendor_model: str = Field(
        ..., min_length=1, description="The model of `tco.vendor.models` that the same tokens "
        "would have gone to.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_way_to_pay(self) -> TcoModel:
        if (self.owned is None) == (self.leased is None):
            raise ValueError("give exactly one of `owned` and `leased`")
        return self


class VendorPrice(Strict):
    prompt: Decimal = Field(..., **_MONEY, description="Per 1M uncached prompt tokens.")
    cached_prompt: Decimal | None = Field(
        None, **_MONEY, description="Per 1M cached prompt tokens (default: the prompt price)."
    )
    completion: Decimal = Field(..., **_MONEY, description="Per 1M completion tokens.")


class VendorPriceList(Strict):
    name: str = Field(..., min_length=1, description="Whose list, e.g. the vendor's name.")
    as_of: date = Field(..., description="The day the prices were read from the vendor's list.")
    currency: str = Field(..., pattern=CURRENCY, description="ISO 4217 code of the list.")
    models: dict[str, VendorPrice] = Field(
        ..., min_length=1, description="Prices per 1M tokens, by the vendor's model name."
    )


class TcoSettings(Strict):
    currency: str | None = Field(
        None, pattern=CURRENCY, description="Currency of the GPU costs (default: "
        "`metering.currency`); the vendor list must be in it too.",
    )  # fmt: skip
    models: dict[str, TcoModel] = Field(
        default_factory=dict, description="The GPU-hour price book, by model alias."
    )
    vendor: VendorPriceList | None = Field(None, description="The vendor price list compared.")


def tco_currency(settings: Any) -> str:
    return settings.tco.currency or settings.metering.currency


def _consistent(settings: Any) -> list[str]:
    tco: TcoSettings = settings.tco
    errors = [
        f"tco.models.{m}: unknown model {m!r}" for m in tco.models if m not in settings.models
    ]
    if tco.models and tco.vendor is None:
        errors.append("tco.models needs tco.vendor: the price list the models are compared with")
    if tco.vendor is not None:
        if tco.vendor.currency != tco_currency(settings):
            errors.append(
                f"tco.vendor.currency is {tco.vendor.currency} but the GPU costs are in "
                f"{tco_currency(settings)}: Bastion converts no currency (price both in one)"
            )
        for m, t in tco.models.items():
            if t.vendor_model not in tco.vendor.models:
                errors.append(
                    f"tco.models.{m}.vendor_model: {t.vendor_model!r} is not in tco.vendor.models"
                )
    return errors


section(
    "tco",
    TcoSettings,
    "GPU-hour price book and vendor price list for `bastion report tco`.",
    check=_consistent,
)
