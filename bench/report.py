"""What a run of ``bench/overhead.py`` records, and how it shows it: the points, the Markdown
table and the JSON file.

Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stub import DIRECT, GATEWAY
from bench.wrk import WrkStats


# -- the record of a run ------------------------------------------------------------------------
@dataclass
class Point:
    target: str
    concurrency: int
    url: str
    stats: WrkStats | None = None
    error: str | None = None
    raw: str = ""


@dataclass
class Report:
    started: str
    args: dict[str, Any]
    env: dict[str, Any]
    points: list[Point] = field(default_factory=list)


# -- the table and the JSON file ----------------------------------------------------------------
def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def render_table(points: Sequence[Point]) -> str:
    """A Markdown table. "added p50" and "req/s ratio" compare with the direct point at the
    same concurrency; "vs baseline" (with a bastion@REF target) is this tree's req/s over the
    baseline's."""
    direct = {p.concurrency: p.stats for p in points if p.target == DIRECT and p.stats}
    baseline = {
        p.concurrency: p.stats for p in points if p.target.startswith(GATEWAY + "@") and p.stats
    }
    header = ["target", "conc", "req/s", "p50", "p99", "added p50", "req/s ratio"]
    if any(p.target.startswith(GATEWAY + "@") for p in points):
        header.append("vs baseline")
    header.append("errors")
    rows = []
    for p in points:
        row = _row(p, direct.get(p.concurrency))
        if "vs baseline" in header:
            base = baseline.get(p.concurrency)
            vs = "-"
            if p.target == GATEWAY and p.stats and base and base.requests_per_sec:
                vs = f"{p.stats.requests_per_sec / base.requests_per_sec:.3f}"
            row.insert(-1, vs)
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        # The first two columns (target, conc) are left-aligned, the numbers right-aligned.
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row(p: Point, direct: WrkStats | None) -> list[str]:
    if p.stats is None:
        what = "FAILED" if p.error else "n/a"
        return [p.target, str(p.concurrency), what, "-", "-", "-", "-", "-"]
    added = ratio = "-"
    if p.target != DIRECT and direct is not None:
        added = f"{p.stats.p50_ms - direct.p50_ms:+.3f} ms"
        if direct.requests_per_sec:
            ratio = f"{p.stats.requests_per_sec / direct.requests_per_sec:.3f}"
    return [
        p.target,
        str(p.concurrency),
        f"{p.stats.requests_per_sec:,.0f}",
        fmt_ms(p.stats.p50_ms),
        fmt_ms(p.stats.p99_ms),
        added,
        ratio,
        str(p.stats.errors),
    ]


def save_json(path: Path, report: Report) -> None:
    doc = asdict(report)
    # asdict() leaves out properties; keep the error count next to the raw counters.
    for p, d in zip(report.points, doc["points"], strict=True):
        if p.stats is not None:
            d["stats"]["errors"] = p.stats.errors
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
