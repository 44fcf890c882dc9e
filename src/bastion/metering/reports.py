"""Usage summaries for `bastion usage` and the admin API: tokens, requests and cost per group.

Costs are summed as integer micro-units, per currency (a group that used models priced in two
currencies gets one row per currency; amounts in different currencies are never added), and
shown as exact decimal strings with six places ("0.000150"), in JSON too: never a float.
Whole hours are read from the hourly rollups (`metering/rollups.py`), which the usage writer
keeps in step with the records: a month of 10^6 records is summed in milliseconds."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import Engine, case, func, select

from bastion.metering.hourly import hour_of
from bastion.metering.rollups import aggregate, is_hour
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
    """Sums per group and currency over [since, until): the whole hours from the hourly rollups
    (exact: they are written with the records), the minutes before the first and after the last
    whole hour from the records themselves, added together."""
    first = since if since is None or is_hour(since) else hour_of(since) + timedelta(hours=1)
    last = until if until is None or is_hour(until) else hour_of(until)
    acc: dict[tuple[Any, Any], dict[str, int]] = {}
    if first is None or last is None or first < last:
        rows = aggregate(
            engine,
            [] if by == "day" else [by],
            first,
            last,
            {"team": team} if team is not None else None,
            step="day" if by == "day" else None,
        )
        for r in rows:
            _add(acc, r["period"] if by == "day" else r[by], r)
    edges = []
    if first is not None and last is not None and first >= last:
        edges.append((since, until))  # all inside one hour
    else:
        if since is not None and first != since:
            edges.append((since, first))
        if until is not None and last != until:
            edges.append((last, until))
    for lo, hi in edges:
        for r in summarize_raw(engine, by, lo, hi, team):
            _add(acc, r.group, r._mapping)
    out = []
    for (group, currency), a in sorted(acc.items(), key=lambda kv: _order(kv[0])):
        out.append(
            {
                by: group if group is not None else "(none)",
                "requests": a["requests"],
                "errors": a["errors"],
                "prompt_tokens": a["prompt_tokens"],
                "cached_tokens": a["cached_tokens"],
                "completion_tokens": a["completion_tokens"],
                "total_tokens": a["prompt_tokens"] + a["completion_tokens"],
                "cost": money(a["cost_micros"]),
                "currency": currency,
            }
        )
    return out


_SUMMED = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens")


def _add(acc: dict[tuple[Any, Any], dict[str, int]], group: Any, r: Any) -> None:
    a = acc.setdefault((group, r["currency"] or None), dict.fromkeys([*_SUMMED, "cost_micros"], 0))
    for k in (*_SUMMED, "cost_micros"):
        a[k] += int(r[k] or 0)


def _order(key: tuple[Any, Any]) -> tuple[Any, ...]:
    group, currency = key
    return (group is None, str(group or ""), currency is None, currency or "")


def summarize_raw(
    engine: Engine, by: GroupBy, since: datetime | None, until: datetime | None, team: str | None
) -> list[Any]:
    """The same sums straight from the usage records (for the odd minutes of a period)."""
    col = _day(engine) if by == "day" else GROUPS[by]
    q = select(
        col.label("group"),
        func.count().label("requests"),
        func.sum(case((usage.c.outcome != "ok", 1), else_=0)).label("errors"),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(usage.c.cost_micros), 0).label("cost_micros"),
        usage.c.currency,
    ).group_by(col, usage.c.currency)
    if since is not None:
        q = q.where(usage.c.ts >= since)
    if until is not None:
        q = q.where(usage.c.ts < until)
    if team is not None:
        q = q.where(usage.c.team == team)
    with engine.connect() as conn:
        return list(conn.execute(q).all())


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
