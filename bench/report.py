"""What a run of ``bench/overhead.py`` records, and how it shows it: the points, the Markdown
table and the JSON file.

Standard library only.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.stub import DIRECT, GATEWAY
from bench.wrk import WrkStats

T = TypeVar("T")


# -- the record of a run ------------------------------------------------------------------------
@dataclass
class Point:
    target: str
    concurrency: int
    url: str
    round: int = 0  # `--rounds`: the repetition this point belongs to
    stats: WrkStats | None = None
    error: str | None = None
    raw: str = ""
    # CPU time of the target's server (its whole session) over the measured wrk run, and that
    # over the requests wrk completed; None for the direct stub.
    cpu_s: float | None = None
    cpu_us_per_req: float | None = None


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


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} µs" if v < 10 else f"{v:,.0f} µs"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def render_table(points: Sequence[Point]) -> str:
    """A Markdown table. "added p50" and "req/s ratio" compare with the direct point at the
    same concurrency; "vs baseline" and "cpu vs baseline" (with a bastion@REF target) are this
    tree's req/s and cpu/req over the baseline's."""
    direct = {(p.concurrency, p.round): p for p in points if p.target == DIRECT and p.stats}
    baseline = {(p.concurrency, p.round): p for p in points if p.target.startswith(GATEWAY + "@")}
    rounds = len({p.round for p in points}) > 1
    header = ["target", "conc", "req/s", "p50", "p99", "added p50", "req/s ratio", "cpu/req"]
    if rounds:
        header.insert(2, "round")
    if baseline:
        header += ["vs baseline", "cpu vs baseline"]
    header.append("errors")
    rows = []
    for p in points:
        row = _row(p, direct.get((p.concurrency, p.round)))
        if rounds:
            row.insert(2, str(p.round + 1))
        if baseline:
            base = baseline.get((p.concurrency, p.round))
            vs = cpu_vs = "-"
            if p.target == GATEWAY and base is not None:
                if p.stats and base.stats:
                    vs = _ratio(p.stats.requests_per_sec, base.stats.requests_per_sec)
                cpu_vs = _ratio(p.cpu_us_per_req, base.cpu_us_per_req)
            row[-1:-1] = [vs, cpu_vs]
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


def alternating(items: Sequence[T], round_: int) -> list[T]:
    """The first item (the direct stub), then the rest in reverse order every other round:
    whichever of two gateways runs second measures a few % better (an A/A run showed it)."""
    return [items[0], *(items[1:] if round_ % 2 == 0 else items[:0:-1])]


def baseline_summary(points: Sequence[Point]) -> list[str]:
    """Per concurrency, this tree's req/s and cpu/req over the baseline's in each round, and
    their medians: the order of two targets in a round biases a single run by several %, so
    `--rounds` alternates it and the median is the figure to quote."""
    base = {(p.concurrency, p.round): p for p in points if p.target.startswith(GATEWAY + "@")}
    out = []
    for conc in sorted({p.concurrency for p in points}):
        rps, cpu = [], []
        for p in points:
            b = base.get((p.concurrency, p.round))
            if p.target != GATEWAY or p.concurrency != conc or b is None:
                continue
            if p.stats and b.stats and b.stats.requests_per_sec:
                rps.append(p.stats.requests_per_sec / b.stats.requests_per_sec)
            if p.cpu_us_per_req and b.cpu_us_per_req:
                cpu.append(p.cpu_us_per_req / b.cpu_us_per_req)
        if rps:
            out.append(
                f"c={conc}: req/s vs baseline {', '.join(f'{r:.3f}' for r in rps)} "
                f"(median {statistics.median(rps):.3f}); cpu/req vs baseline "
                f"{', '.join(f'{c:.3f}' for c in cpu)} "
                f"(median {statistics.median(cpu) if cpu else float('nan'):.3f})"
            )
    return out


def _row(p: Point, direct: Point | None) -> list[str]:
    if p.stats is None:
        what = "FAILED" if p.error else "n/a"
        return [p.target, str(p.concurrency), what, *["-"] * 6]
    added = ratio = "-"
    if p.target != DIRECT and direct is not None and direct.stats is not None:
        added = f"{p.stats.p50_ms - direct.stats.p50_ms:+.3f} ms"
        ratio = _ratio(p.stats.requests_per_sec, direct.stats.requests_per_sec)
    return [
        p.target,
        str(p.concurrency),
        f"{p.stats.requests_per_sec:,.0f}",
        fmt_ms(p.stats.p50_ms),
        fmt_ms(p.stats.p99_ms),
        added,
        ratio,
        fmt_us(p.cpu_us_per_req),
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
