"""Which limits apply to a request: one `Level` per key, user, team, cost center, model and
team x model that has any limit set, each with the counters it needs for this instant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bastion.config import LimitSettings, Settings
from bastion.identity.principal import Principal
from bastion.policy.counters import SLOT_LEASE_SECONDS, Check

WINDOW = 60  # seconds: rpm and tpm count per calendar minute


@dataclass(frozen=True, slots=True)
class Level:
    scope: str  # key | user | team | cost_center | model | team_model
    ident: str  # "alpha", or "alpha|tiny" for team_model
    label: str  # for people: "team 'alpha'"
    limits: LimitSettings


def applicable_levels(settings: Settings, p: Principal, model: str) -> list[Level]:
    d = settings.limits.defaults
    team = settings.teams.get(p.team)
    cc = settings.cost_centers.get(p.cost_center)
    candidates = [
        Level("key", p.key_id, f"key '{p.key_id}'", p.limits or d.key),
        Level("team", p.team, f"team '{p.team}'", (team and team.limits) or d.team),
        Level(
            "cost_center",
            p.cost_center,
            f"cost center '{p.cost_center}'",
            (cc and cc.limits) or d.cost_center,
        ),
        Level("model", model, f"model '{model}'", settings.models[model].limits),
    ]
    if p.user:
        candidates.insert(1, Level("user", p.user, f"user '{p.user}'", d.user))
    if team and (tm := team.model_limits.get(model)):
        candidates.append(
            Level("team_model", f"{p.team}|{model}", f"team '{p.team}' on model '{model}'", tm)
        )
    return [lv for lv in candidates if not lv.limits.is_empty()]


def budget_period(kind: str, now: datetime) -> tuple[str, datetime, datetime]:
    """(name, start, end) of the UTC day or calendar month that contains `now`."""
    if kind == "budget_day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.strftime("%Y-%m"), start, (start + timedelta(days=32)).replace(day=1)


def checks_for(
    levels: list[Level], tokens: int, cost_micros: int, now: float | None = None
) -> list[Check]:
    """The counters this request must fit into, at every level."""
    now = now if now is not None else datetime.now(UTC).timestamp()
    window = int(now // WINDOW)
    window_end = (window + 1) * WINDOW
    today = datetime.fromtimestamp(now, UTC)
    out: list[Check] = []
    for lv in levels:
        base = f"bst:{lv.scope}:{lv.ident}"
        lim = lv.limits
        if lim.rpm is not None:
            out.append(
                Check(
                    lv.label,
                    "rpm",
                    f"{base}:rpm:{window}",
                    "counter",
                    lim.rpm,
                    1,
                    2 * WINDOW,
                    window_end,
                )
            )
        if lim.tpm is not None:
            out.append(
                Check(
                    lv.label,
                    "tpm",
                    f"{base}:tpm:{window}",
                    "counter",
                    lim.tpm,
                    tokens,
                    2 * WINDOW,
                    window_end,
                )
            )
        if lim.concurrent is not None:
            out.append(
                Check(
                    lv.label,
                    "concurrent",
                    f"{base}:inflight",
                    "slots",
                    lim.concurrent,
                    1,
                    SLOT_LEASE_SECONDS,
                    now + 1,
                )
            )
        for kind, budget in (("budget_day", lim.budget_day), ("budget_month", lim.budget_month)):
            if budget is None:
                continue
            name, _start, end = budget_period(kind, today)
            ttl = int(end.timestamp() - now) + 86_400  # outlives its period by a day
            out.append(
                Check(
                    lv.label,
                    kind,
                    f"{base}:{kind}:{name}",
                    "budget",
                    math.floor(budget * 1_000_000),
                    cost_micros,
                    ttl,
                    end.timestamp(),
                )
            )
    return out
