"""Comparison reports: Markdown, JSON, and one self-contained HTML file.

The HTML has no network assets at all (no CDN, no fonts, no scripts): its plots are SVG
written here, so the report opens on an air-gapped analyst's machine and can be archived as
evidence exactly as it was.
"""

from __future__ import annotations

import json
from html import escape

from bastion.evals.compare import Comparison, MetricResult

A_COLOR, B_COLOR = "#7a8ca3", "#d9822b"


def _fmt(v: float, metric: str) -> str:
    if metric in ("latency_ms", "ttft_ms"):
        return f"{v:.0f}"
    if metric == "cost":
        return f"{v:.6f}"
    if metric == "completion_tokens":
        return f"{v:.1f}"
    return f"{v:.3f}"


def _signed(v: float, metric: str) -> str:
    return ("+" if v >= 0 else "") + _fmt(v, metric)


def _row(m: MetricResult) -> str:
    ci = f"[{_signed(m.low, m.metric)}, {_signed(m.high, m.metric)}]"
    thr = (
        ""
        if m.threshold is None
        else f" (threshold {m.threshold:g}: {'met' if m.meets_threshold else 'NOT met'})"
    )
    return (
        f"| {m.metric} | {_fmt(m.mean_a, m.metric)} | {_fmt(m.mean_b, m.metric)} "
        f"| {_signed(m.delta, m.metric)} | {ci} | {m.verdict}{thr} |"
    )


def markdown(c: Comparison) -> str:
    a, b = c.run_a, c.run_b
    lines = [
        f"# Eval comparison: {a['id']} (A) vs {b['id']} (B)",
        "",
        *(
            f"- {k}: suite `{r['suite']}` v{r['suite_version']}, model `{r['model']}`, "
            f"{r['samples']} sample(s), {r['status']}"
            for k, r in (("A", a), ("B", b))
        ),
        f"- {c.metrics[0].n} paired cases; paired bootstrap, {c.resamples} resamples, "
        f"seed {c.seed}, "
        f"{c.level:.0%} percentile intervals of the mean of B - A",
        "",
        "| metric | A | B | B - A | CI | verdict |",
        "|---|---|---|---|---|---|",
        *(_row(m) for m in c.metrics),
        "",
        f"**Flipped pass → fail ({len(c.pass_to_fail)}):** {', '.join(c.pass_to_fail) or 'none'}",
        "",
        f"**Flipped fail → pass ({len(c.fail_to_pass)}):** {', '.join(c.fail_to_pass) or 'none'}",
    ]
    if c.per_tag:
        lines += ["", "| tag | cases | pass A | pass B |", "|---|---|---|---|"]
        lines += [
            f"| {t} | {v['n']:.0f} | {v['a']:.3f} | {v['b']:.3f} |" for t, v in c.per_tag.items()
        ]
    if c.only_a or c.only_b:
        lines += [
            "",
            f"Only in A: {', '.join(c.only_a) or '-'}; only in B: {', '.join(c.only_b) or '-'}",
        ]
    lines += [f"\n> warning: {w}" for w in c.warnings]
    return "\n".join(lines) + "\n"


def as_json(c: Comparison) -> str:
    return json.dumps(c.as_dict(), indent=2, default=str) + "\n"


# -- SVG ----------------------------------------------------------------------------------------
def _svg(w: int, h: int, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'
        f'<text x="8" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def grouped_bars(
    groups: list[tuple[str, float, float]], title: str, top: float | None = None
) -> str:
    """A vs B bars per group (per tag, or a latency/cost metric), values printed on top."""
    w, h, pad, base = max(240, 90 * len(groups) + 60), 220, 40, 190
    top = top or max([max(a, b) for _, a, b in groups] + [1e-9])
    body = []
    for i, (label, a, b) in enumerate(groups):
        x = pad + i * 90
        for j, (v, col) in enumerate(((a, A_COLOR), (b, B_COLOR))):
            bh = 150 * v / top
            body.append(
                f'<rect x="{x + j * 32}" y="{base - bh:.1f}" width="30" '
                f'height="{bh:.1f}" fill="{col}"/>'
            )
            body.append(
                f'<text x="{x + j * 32 + 15}" y="{base - bh - 3:.1f}" font-size="10" '
                f'text-anchor="middle">{v:.3g}</text>'
            )
        body.append(
            f'<text x="{x + 31}" y="{base + 16}" font-size="11" '
            f'text-anchor="middle">{escape(label[:14])}</text>'
        )
    body.append(f'<line x1="{pad - 5}" y1="{base}" x2="{w - 10}" y2="{base}" stroke="#333"/>')
    return _svg(w, h, body, title)


def histogram(a: list[float], b: list[float], title: str, bins: int = 10) -> str:
    """Per-case score distributions of A and B on [0, 1], side by side in each bin."""

    def counts(xs: list[float]) -> list[int]:
        out = [0] * bins
        for x in xs:
            out[min(bins - 1, int(x * bins))] += 1
        return out

    ca, cb = counts(a), counts(b)
    top = max(ca + cb + [1])
    w, h, pad, base = 420, 220, 30, 185
    body = []
    for i in range(bins):
        x = pad + i * 36
        for j, (n, col) in enumerate(((ca[i], A_COLOR), (cb[i], B_COLOR))):
            bh = 150 * n / top
            body.append(
                f'<rect x="{x + j * 16}" y="{base - bh:.1f}" width="15" '
                f'height="{bh:.1f}" fill="{col}"><title>{n}</title></rect>'
            )
        body.append(f'<text x="{x}" y="{base + 14}" font-size="9">{i / bins:.1f}</text>')
    body.append(f'<line x1="{pad}" y1="{base}" x2="{w - 10}" y2="{base}" stroke="#333"/>')
    return _svg(w, h, body, title)


def forest(metrics: list[MetricResult]) -> str:
    """Each metric's delta and CI on its own scale (metrics have different units), zero marked."""
    w, row = 560, 26
    h = 40 + row * len(metrics)
    body = []
    for i, m in enumerate(metrics):
        y = 36 + i * row
        span = max(abs(m.low), abs(m.high), abs(m.delta), 1e-12)
        sx = lambda v, s=span: 360 + 150 * v / s  # noqa: E731
        col = {"better": "#2a7f3f", "worse": "#b3261e"}.get(m.verdict, "#555")
        body.append(f'<text x="8" y="{y + 4}" font-size="11">{escape(m.metric)}</text>')
        body.append(
            f'<line x1="360" y1="{y - 9}" x2="360" y2="{y + 9}" '
            'stroke="#999" stroke-dasharray="2"/>'
        )
        body.append(
            f'<line x1="{sx(m.low):.1f}" y1="{y}" x2="{sx(m.high):.1f}" y2="{y}" '
            f'stroke="{col}" stroke-width="3"/>'
        )
        body.append(f'<circle cx="{sx(m.delta):.1f}" cy="{y}" r="4" fill="{col}"/>')
        body.append(
            f'<text x="520" y="{y + 4}" font-size="10" '
            f'fill="{col}">{escape(m.verdict.split()[0])}</text>'
        )
    return _svg(w, h, body, "B - A with its confidence interval (each row on its own scale)")


def html(c: Comparison) -> str:
    parts = [forest(c.metrics)]
    for m in c.metrics:
        if m.metric == "pass" or m.metric.startswith("score:"):
            a = [agg.metrics[m.metric] for agg in c.cases_a.values()]
            b = [agg.metrics[m.metric] for agg in c.cases_b.values()]
            parts.append(histogram(a, b, f"distribution of per-case {m.metric}"))
    if c.per_tag:
        parts.append(
            grouped_bars(
                [(t, v["a"], v["b"]) for t, v in c.per_tag.items()], "pass rate per tag", 1.0
            )
        )
    for m in c.metrics:
        if m.metric in ("latency_ms", "ttft_ms", "completion_tokens", "cost"):
            parts.append(grouped_bars([(m.metric, m.mean_a, m.mean_b)], f"mean {m.metric}"))
    legend = (
        f'<p><span style="color:{A_COLOR}">■ A {escape(c.run_a["id"])}</span> '
        f'<span style="color:{B_COLOR}">■ B {escape(c.run_b["id"])}</span></p>'
    )
    md = escape(markdown(c))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Eval comparison {escape(c.run_a['id'])} vs {escape(c.run_b['id'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "svg{margin:6px;border:1px solid #ddd}pre{background:#f6f6f6;padding:1em}</style>"
        f"</head><body><h1>Eval comparison</h1>{legend}<div>{''.join(parts)}</div>"
        f"<h2>Summary</h2><pre>{md}</pre></body></html>\n"
    )
