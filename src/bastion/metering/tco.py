"""`bastion report tco`: what a month of self-hosted tokens cost, against a vendor's prices.

The method (docs/chargeback.md has a worked example):

- GPU-hour: owned = purchase / (years x 8760 h) + kW x price per kWh; leased = the lease price;
  either x (1 + ops share).
- Price per 1M tokens, the issue's formula: GPU-hour x GPUs x 10⁶ / (tokens/s x 3600) /
  utilisation; a cached prompt token costs `cached_prompt_ratio` of that.
- A month's self-hosted cost is the capacity paid for, whether used or not: GPU-hour x GPUs x
  hours (elapsed hours, for the month in progress). Its actual price per 1M tokens is that
  over the month's weighted tokens (uncached prompt + completion + ratio x cached), which is the
  formula at the month's actual utilisation.
- The vendor cost is the same tokens at the vendor's list. Break-even is the volume (and the
  utilisation) at which the vendor would have cost the capacity, at this month's token mix;
  above 100 % utilisation the deployment cannot break even at its throughput.

Arithmetic is exact (Decimal); amounts are shown rounded half up to the micro-unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import Engine

from bastion.metering.rollups import aggregate, month_range
from bastion.metering.tco_settings import TcoModel, VendorPrice, VendorPriceList, tco_currency

HOURS_PER_YEAR = Decimal(8760)
MILLION = Decimal(10**6)
MICRO = Decimal("0.000001")


def gpu_hour(m: TcoModel) -> Decimal:
    """The cost of one GPU-hour, operations included."""
    if m.owned is not None:
        o = m.owned
        base = o.purchase_price / (o.years * HOURS_PER_YEAR) + o.power_kw * o.price_per_kwh
    else:
        assert m.leased is not None  # the settings require one of the two
        base = m.leased.price_per_gpu_hour
    return base * (1 + m.ops_share)


def per_million(m: TcoModel, utilisation: Decimal | None = None) -> Decimal:
    """Price per 1M (uncached) tokens at `utilisation` (default: the planned one)."""
    u = m.utilisation if utilisation is None else utilisation
    return gpu_hour(m) * m.gpus * MILLION / (m.throughput_tokens_per_second * 3600) / u


@dataclass(frozen=True)
class Tokens:
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    @property
    def uncached(self) -> int:
        return self.prompt - min(self.cached, self.prompt)

    def weighted(self, ratio: Decimal) -> Decimal:
        """Tokens in units of the measured throughput: a cached one counts `ratio`."""
        return self.uncached + self.completion + ratio * min(self.cached, self.prompt)


def vendor_cost(t: Tokens, p: VendorPrice) -> Decimal:
    cached = p.cached_prompt if p.cached_prompt is not None else p.prompt
    return (
        t.uncached * p.prompt + min(t.cached, t.prompt) * cached + t.completion * p.completion
    ) / MILLION


def compare(m: TcoModel, vendor: VendorPrice, t: Tokens, hours: Decimal) -> dict[str, Any]:
    """The month's numbers for one alias (exact Decimals; `present` formats them)."""
    capacity = gpu_hour(m) * m.gpus * hours
    weighted = t.weighted(m.cached_prompt_ratio)
    capacity_tokens = m.throughput_tokens_per_second * 3600 * hours
    vend = vendor_cost(t, vendor)
    out: dict[str, Any] = {
        "gpu_hour": gpu_hour(m),
        "per_million_planned": per_million(m),
        "cached_per_million_planned": per_million(m) * m.cached_prompt_ratio,
        "hours": hours,
        "self_cost": capacity,
        "self_cost_at_planned_price": weighted * per_million(m) / MILLION,
        "vendor_cost": vend,
        "savings": vend - capacity,
        "utilisation": weighted / capacity_tokens if capacity_tokens else Decimal(0),
        "per_million_actual": capacity * MILLION / weighted if weighted else None,
        "break_even_tokens": None,
        "break_even_utilisation": None,
    }
    total = t.prompt + t.completion
    if vend > 0:
        # The vendor's cost grows with volume at this mix; the capacity's does not.
        factor = capacity / vend
        out["break_even_tokens"] = (total * factor).to_integral_value(ROUND_HALF_UP)
        out["break_even_utilisation"] = out["utilisation"] * factor
    return out


def verdict(r: dict[str, Any]) -> str:
    if r["savings"] > 0:
        return "self-hosting is cheaper"
    if r["break_even_utilisation"] is None:
        return "no priced usage: the capacity is all cost"
    if r["break_even_utilisation"] > 1:
        return "self-hosting costs more and cannot break even at this throughput"
    return "self-hosting costs more at this volume"


def _money(d: Decimal | None) -> str | None:
    return None if d is None else format(d.quantize(MICRO, ROUND_HALF_UP), "f")


def _ratio(d: Decimal | None) -> str | None:
    return None if d is None else format(d.quantize(Decimal("0.0001"), ROUND_HALF_UP), "f")


def month_hours(month: str, now: datetime | None = None) -> tuple[datetime, datetime, Decimal]:
    """The month's [start, end) and its hours so far (all of them once it is over)."""
    start, end = month_range(month)
    now = now or datetime.now(UTC)
    if now <= start:
        raise ValueError(f"month {month} has not begun")
    stop = min(end, now)
    return start, end, Decimal((stop - start).total_seconds()) / 3600


def report(
    engine: Engine, settings: Any, month: str, now: datetime | None = None
) -> list[dict[str, Any]]:
    """One row per alias of `tco.models`: its month of tokens, self-hosted and vendor cost."""
    tco = settings.tco
    if not tco.models or tco.vendor is None:
        raise ValueError("no GPU price book: configure tco.models and tco.vendor")
    start, end, hours = month_hours(month, now)
    used: dict[str, list[int]] = {}
    # The alias whose deployment served the call: a router's choice, else the model called.
    for r in aggregate(engine, ["model", "served-model"], start, end):
        alias = r["served-model"] or r["model"]
        if alias in tco.models:
            u = used.setdefault(alias, [0, 0, 0])
            u[0] += r["prompt_tokens"]
            u[1] += r["cached_tokens"]
            u[2] += r["completion_tokens"]
    vendor: VendorPriceList = tco.vendor
    rows = []
    for alias, m in sorted(tco.models.items()):
        t = Tokens(*used.get(alias, [0, 0, 0]))
        r = compare(m, vendor.models[m.vendor_model], t, hours)
        rows.append(
            {
                "model": alias,
                "month": month,
                "hours": _ratio(hours),
                "prompt_tokens": t.prompt,
                "cached_tokens": t.cached,
                "completion_tokens": t.completion,
                "gpus": m.gpus,
                "gpu_hour": _money(r["gpu_hour"]),
                "per_1m_planned": _money(r["per_million_planned"]),
                "cached_per_1m_planned": _money(r["cached_per_million_planned"]),
                "planned_utilisation": _ratio(m.utilisation),
                "utilisation": _ratio(r["utilisation"]),
                "per_1m_actual": _money(r["per_million_actual"]),
                "self_cost": _money(r["self_cost"]),
                "vendor": f"{vendor.name} {m.vendor_model} ({vendor.as_of.isoformat()})",
                "vendor_cost": _money(r["vendor_cost"]),
                "savings": _money(r["savings"]),
                "break_even_tokens": r["break_even_tokens"] and int(r["break_even_tokens"]),
                "break_even_utilisation": _ratio(r["break_even_utilisation"]),
                "verdict": verdict(r),
                "currency": tco_currency(settings),
            }
        )
    return rows
