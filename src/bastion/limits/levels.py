"""Which limits apply to a request: one `Level` per key, user, team, cost center, model and
team x model that has any limit set, each with the counters it needs for this instant."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from bastion.config import Settings
from bastion.core.settings import LimitSettings
from bastion.identity.principal import Principal
from bastion.limits.counters import SLOT_LEASE_SECONDS, Check, Kind, Op

WINDOW = 60  # seconds: rpm and tpm count what was admitted in the last minute (sliding)


@dataclass(frozen=True, slots=True)
class Level:
    scope: str  # key | user | team | cost_center | model | team_model
    ident: str  # "alpha", or "alpha|tiny" for team_model
    label: str  # for people: "team 'alpha'"
    limits: LimitSettings


def key_level(settings: Settings, key_id: str, own: LimitSettings | None) -> Level:
    # A key's own limits only ever tighten `limits.defaults.key`, field by field.
    return Level("key", key_id, f"key '{key_id}'", settings.limits.defaults.key.tightened(own))


def team_level(settings: Settings, team: str) -> Level:
    t = settings.teams.get(team)
    return Level("team", team, f"team '{team}'", (t and t.limits) or settings.limits.defaults.team)


def cost_center_level(settings: Settings, cc: str) -> Level:
    c = settings.cost_centers.get(cc)
    limits = (c and c.limits) or settings.limits.defaults.cost_center
    return Level("cost_center", cc, f"cost center '{cc}'", limits)


def model_level(settings: Settings, model: str) -> Level:
    return Level("model", model, f"model '{model}'", settings.models[model].limits)


def team_model_levels(settings: Settings, team: str, model: str | None = None) -> list[Level]:
    """team x model limits: for one model, or for every model the team has them for."""
    t = settings.teams.get(team)
    limits = t.model_limits if t else {}
    return [
        Level("team_model", f"{team}|{m}", f"team '{team}' on model '{m}'", lim)
        for m, lim in limits.items()
        if model is None or m == model
    ]


def applicable_levels(settings: Settings, p: Principal, model: str) -> list[Level]:
    candidates = [key_level(settings, p.key_id, p.limits)]
    if p.user:
        candidates.append(Level("user", p.user, f"user '{p.user}'", settings.limits.defaults.user))
    candidates += [
        team_level(settings, p.team),
        cost_center_level(settings, p.cost_center),
        model_level(settings, model),
        *team_model_levels(settings, p.team, model),
    ]
    return [lv for lv in candidates if not lv.limits.is_empty()]


def budget_period(kind: str, now: datetime) -> tuple[str, datetime, datetime]:
    """(name, start, end) of the UTC day or calendar month that contains `now`."""
    if kind == "budget_day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.strftime("%Y-%m"), start, (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True, slots=True)
class _Template:
    level: str
    kind: Kind
    prefix: str  # the counter key without its window or period
    op: Op
    limit: int
    currency: str | None = None  # a budget's


@dataclass(frozen=True, slots=True)
class Plan:
    """The limits of one (caller, model) pair, compiled once and reused for every request."""

    levels: tuple[Level, ...]
    templates: tuple[_Template, ...]

    @classmethod
    def compile(cls, levels: list[Level], currency: str) -> Plan:
        """`currency`: the default of budgets that name none (`metering.currency`)."""
        out = []
        for lv in levels:
            base, lim = f"bst:{lv.scope}:{lv.ident}", lv.limits
            for kind, op, value in (
                ("rpm", "window", lim.rpm),
                ("tpm", "window", lim.tpm),
                ("concurrent", "slots", lim.concurrent),
                ("budget_day", "budget", lim.budget_day),
                ("budget_month", "budget", lim.budget_month),
            ):
                if value is None:
                    continue
                if op == "budget":
                    # Exact: a budget has at most 6 decimal places (LimitSettings).
                    cur = lim.currency or currency
                    limit = int(Decimal(value).scaleb(6))
                    prefix = f"{base}:{kind}:{cur}"  # a counter per currency, never mixed
                    out.append(_Template(lv.label, kind, prefix, op, limit, cur))  # type: ignore[arg-type]
                else:
                    out.append(_Template(lv.label, kind, f"{base}:{kind}", op, int(value)))  # type: ignore[arg-type]
        return cls(tuple(levels), tuple(out))

    def budgets(self) -> list[tuple[str, str]]:
        """(level, currency) of every budget in the plan."""
        return [(t.level, t.currency) for t in self.templates if t.currency is not None]


@functools.lru_cache(maxsize=64)
def _period_of_day(kind: str, day: int) -> tuple[str, float]:
    name, _start, end = budget_period(kind, datetime.fromtimestamp(day * 86_400, UTC))
    return name, end.timestamp()


def checks_for(plan: Plan, tokens: int, cost_micros: int, now: float | None = None) -> list[Check]:
    """The counters this request must fit into, at every level, for this instant."""
    now = time.time() if now is None else now
    day = int(now // 86_400)
    out: list[Check] = []
    for t in plan.templates:
        if t.kind in ("rpm", "tpm"):
            # Admitted now, the entry is the last to leave: the window is empty again then.
            amount = 1 if t.kind == "rpm" else tokens
            c = Check(t.level, t.kind, t.prefix, t.op, t.limit, amount, WINDOW, now + WINDOW)
        elif t.kind == "concurrent":
            c = Check(t.level, t.kind, t.prefix, t.op, t.limit, 1, SLOT_LEASE_SECONDS, now + 1)
        else:
            name, end = _period_of_day(t.kind, day)
            # The counter outlives its period by a day, then expires.
            c = Check(
                t.level,
                t.kind,
                f"{t.prefix}:{name}",
                t.op,
                t.limit,
                cost_micros,
                int(end - now) + 86_400,
                end,
                t.currency,
            )
        out.append(c)
    return out
