"""Usage summaries for `bastion usage` and the admin API: tokens, requests and cost per group.

Costs are summed as integer micro-units, per currency (a group that used models priced in two
currencies gets one row per currency; amounts in different currencies are never added), and
shown as exact decimal strings with six places ("0.000150"), in JSON too: never a float."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy import Engine, case, func, select

from bastion.metering.usage import money
from bastion.store.schema import usage

GroupBy = Literal["team", "cost-center", "model", "day", "key", "user"]
GROUPS: dict[str, Any] = {
    "team": usage.c.team,
    "cost-center": usage.c.cost_center,
    "model": usage.c.model,
    "key": usage.c.key_id,
    "user": usage.c.user,
}


def _day(engine: Engine) -> Any:
    if engine.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", usage.c.ts), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", usage.c.ts)


def summarize(
    engine: Engine,
    by: GroupBy = "team",
    since: datetime | None = None,
    until: datetime | None = None,
    team: str | None = None,
) -> list[dict[str, Any]]:
    col = _day(engine) if by == "day" else GROUPS[by]
    key = col.label("group")
    q = (
        select(
            key,
            func.count().label("requests"),
            func.sum(case((usage.c.outcome != "ok", 1), else_=0)).label("errors"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage.c.cost_micros), 0).label("cost_micros"),
            usage.c.currency,
        )
        .group_by(col, usage.c.currency)
        .order_by(col, usage.c.currency)
    )
    if since is not None:
        q = q.where(usage.c.ts >= since)
    if until is not None:
        q = q.where(usage.c.ts < until)
    if team is not None:
        q = q.where(usage.c.team == team)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for r in rows:
        out.append(
            {
                by: r.group if r.group is not None else "(none)",
                "requests": int(r.requests),
                "errors": int(r.errors or 0),
                "prompt_tokens": int(r.prompt_tokens),
                "cached_tokens": int(r.cached_tokens),
                "completion_tokens": int(r.completion_tokens),
                "total_tokens": int(r.prompt_tokens) + int(r.completion_tokens),
                "cost": money(int(r.cost_micros)),
                "currency": r.currency,
            }
        )
    return out


def render(rows: list[dict[str, Any]], fmt: Literal["table", "csv", "json"]) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
    if not rows:
        return "" if fmt == "csv" else "no usage in this period\n"
    headers = list(rows[0])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=headers, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cells = [[str(h) for h in headers]] + [[_cell(r[h]) for h in headers] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.6f}" if isinstance(v, float) else str(v)
