"""Current usage against every configured limit: for `bastion limits status` and /admin."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from bastion.config import Settings
from bastion.identity.keys import KeyRecord
from bastion.policy.admission import Admission
from bastion.policy.levels import Level, Plan, checks_for

BUDGETS = ("budget_day", "budget_month")


def _levels(settings: Settings, keys: list[KeyRecord], team: str | None) -> list[Level]:
    d = settings.limits.defaults
    out: list[Level] = []
    teams = {team: settings.teams.get(team)} if team else dict(settings.teams)
    for name, t in teams.items():
        out.append(Level("team", name, f"team '{name}'", (t and t.limits) or d.team))
        for model, lim in (t.model_limits if t else {}).items():
            out.append(
                Level("team_model", f"{name}|{model}", f"team '{name}' on model '{model}'", lim)
            )
    centers = {t.cost_center for t in teams.values() if t} if team else set(settings.cost_centers)
    for cc in sorted(centers):
        c = settings.cost_centers.get(cc)
        out.append(
            Level("cost_center", cc, f"cost center '{cc}'", (c and c.limits) or d.cost_center)
        )
    if team is None:
        out += [Level("model", m, f"model '{m}'", ms.limits) for m, ms in settings.models.items()]
    for k in keys:
        if k.status(datetime.now(UTC)) == "active":
            out.append(Level("key", k.id, f"key '{k.id}'", k.limits or d.key))
    return [lv for lv in out if not lv.limits.is_empty()]


async def limit_status(
    admission: Admission, settings: Settings, keys: list[KeyRecord], team: str | None
) -> list[dict[str, Any]]:
    levels = _levels(settings, keys, team)
    checks = checks_for(Plan.compile(levels), 0, 0)
    values = await admission.backend.peek(checks)
    now = time.time()
    rows = []
    for c, used in zip(checks, values, strict=True):
        scale = 1_000_000 if c.kind in BUDGETS else 1
        rows.append(
            {
                "level": c.level,
                "limit_kind": c.kind,
                "limit": c.limit / scale,
                "used": used / scale,
                "remaining": max(0, c.limit - used) / scale,
                "resets_in_seconds": max(0, round(c.reset_at - now))
                if c.kind != "concurrent"
                else None,
            }
        )
    return rows
