"""Current usage against every configured limit: for `bastion limits status` and /admin."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from bastion.config import Settings
from bastion.identity.keys import KeyRecord
from bastion.limits.admission import Admission
from bastion.limits.levels import (
    Level,
    Plan,
    checks_for,
    cost_center_level,
    key_level,
    model_level,
    team_level,
    team_model_levels,
)
from bastion.metering.usage import money

BUDGETS = ("budget_day", "budget_month")


def _levels(settings: Settings, keys: list[KeyRecord], team: str | None) -> list[Level]:
    teams = [team] if team else list(settings.teams)
    out: list[Level] = []
    for name in teams:
        out += [team_level(settings, name), *team_model_levels(settings, name)]
    if team:
        t = settings.teams.get(team)
        centers = [t.cost_center] if t else []
    else:
        centers = sorted(settings.cost_centers)
        out += [model_level(settings, m) for m in settings.models]
    out += [cost_center_level(settings, cc) for cc in centers]
    now = datetime.now(UTC)
    out += [key_level(settings, k.id, k.limits) for k in keys if k.status(now) == "active"]
    return [lv for lv in out if not lv.limits.is_empty()]


async def limit_status(
    admission: Admission, settings: Settings, keys: list[KeyRecord], team: str | None
) -> list[dict[str, Any]]:
    levels = _levels(settings, keys, team)
    checks = checks_for(Plan.compile(levels, settings.metering.currency), 0, 0)
    values = await admission.backend.peek(checks)
    now = time.time()
    rows = []
    for c, used in zip(checks, values, strict=True):
        # Money as exact decimal strings (micro-units underneath), counts as integers.
        show = money if c.kind in BUDGETS else int
        rows.append(
            {
                "level": c.level,
                "limit_kind": c.kind,
                "limit": show(c.limit),
                "used": show(used),
                "remaining": show(max(0, c.limit - used)),
                "currency": c.currency,
                "resets_in_seconds": max(0, round(c.reset_at - now))
                if c.kind in BUDGETS
                else None,  # a sliding window has no reset instant; a slot count neither
            }
        )
    return rows
