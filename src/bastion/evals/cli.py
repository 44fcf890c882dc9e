"""`bastion eval run|list|show|compare|suites|schema|validate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from bastion.evals.suite import SuiteError


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("eval", help="eval suites run through the gateway, and comparisons")
    evs = ev.add_subparsers(dest="eval_cmd", required=True)

    s = evs.add_parser("run", parents=[common], help="run a suite against a model alias")
    s.add_argument("suite", help="a suite file (.yaml/.jsonl) or a shipped suite's name")
    s.add_argument("--model", help="the alias to evaluate (default with --resume: the run's)")
    s.add_argument(
        "--adapter",
        metavar="NAME@VERSION",
        help="a registry adapter: evaluated through the alias it is deployed under (deploy a "
        "validated one with `bastion models deploy REF --to ALIAS --staging`)",
    )
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--samples", type=int, default=1, help="answers per case (pass@k)")
    s.add_argument("--temperature", type=float, help="over the suite's (samples > 1 want > 0)")
    s.add_argument("--max-tokens", type=int, help="over the suite's")
    s.add_argument("--url", help="gateway URL (default: from the config's server section)")
    s.add_argument("--key", help="API key (default: $BASTION_EVAL_KEY, else $OPENAI_API_KEY)")
    s.add_argument("--resume", metavar="RUN_ID", help="continue a run: finished cases are kept")
    s.add_argument("--timeout", type=float, default=120, help="seconds per call")
    s.set_defaults(func=cmd_run)

    s = evs.add_parser("list", parents=[common], help="recent runs")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_list)

    s = evs.add_parser("show", parents=[common], help="one run: summary and per-case results")
    s.add_argument("run_id")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_show)

    s = evs.add_parser("compare", parents=[common], help="B against A with bootstrap CIs")
    s.add_argument("run_a", help="baseline (e.g. the version in production)")
    s.add_argument("run_b", help="candidate")
    s.add_argument("--level", type=float, default=0.95)
    s.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (10000)")
    s.add_argument("--format", choices=["md", "json", "html"], default="md")
    s.add_argument("--out", help="write the report here (default: stdout)")
    s.add_argument("--fail-on-worse", action="store_true", help="exit 1 if any metric is worse")
    s.set_defaults(func=cmd_compare)

    s = evs.add_parser("validate", help="check a suite file without running it")
    s.add_argument("suite")
    s.set_defaults(func=cmd_validate)
    s = evs.add_parser("suites", help="the example suites shipped with Bastion")
    s.set_defaults(func=cmd_suites)
    s = evs.add_parser("schema", help="the suite format as JSON Schema")
    s.set_defaults(func=cmd_schema)


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from bastion.config import load_settings

    return load_settings(args.config)


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The configured database, migrated (as every other command opens it)."""
    from bastion.identity.teams import open_store

    return open_store(_settings(args))


def cmd_validate(args: argparse.Namespace) -> int:
    from bastion.evals.scorers import make_scorer
    from bastion.evals.suite import load_suite

    try:
        suite, _ = load_suite(args.suite)
        for case in suite.cases:
            for spec in suite.scorers_for(case):
                if spec.name not in ("judge", "embedding_similarity"):  # these need a gateway
                    make_scorer(spec, None)
    except SuiteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"suite OK: {suite.name} v{suite.version}, {len(suite.cases)} case(s)\n")
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
    from bastion.evals.suite import BUILTIN_DIR, builtin_names, load_suite

    for name in builtin_names():
        suite, _ = load_suite(name)
        sys.stdout.write(f"{name:<20} {len(suite.cases):>3} cases  {suite.description}\n")
    sys.stdout.write(f"(files in {BUILTIN_DIR})\n")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from bastion.evals.suite import suite_json_schema

    sys.stdout.write(json.dumps(suite_json_schema(), indent=2) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import openai

    from bastion.evals import store
    from bastion.evals.runner import RunAborted, marker, run_suite
    from bastion.evals.scorers import make_scorer
    from bastion.evals.suite import load_suite, resolve_path

    try:
        suite, sha = load_suite(args.suite)
        for case in suite.cases:  # refuse bad scorer names/parameters before any call
            for spec in suite.scorers_for(case):
                if spec.name not in ("judge", "embedding_similarity"):
                    make_scorer(spec, None)
    except SuiteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    key = args.key or os.environ.get("BASTION_EVAL_KEY") or os.environ.get("OPENAI_API_KEY")
    if not key:
        sys.stderr.write("error: no API key: --key, $BASTION_EVAL_KEY or $OPENAI_API_KEY\n")
        return 2
    if args.samples < 1 or args.concurrency < 1:
        sys.stderr.write("error: --samples and --concurrency are at least 1\n")
        return 2
    settings = _settings(args)
    engine = _engine(args)
    overrides: dict[str, Any] = {}
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    if args.max_tokens is not None:
        overrides["max_tokens"] = args.max_tokens
    server = settings.server
    url = args.url or server.public_url or f"http://{server.host}:{server.port}"
    if args.resume:
        run = store.get_run(engine, args.resume)
        if run is None:
            sys.stderr.write(f"error: no eval run {args.resume!r}\n")
            return 2
        if run["suite_sha256"] != sha:
            sys.stderr.write(
                f"error: {args.suite} is not the suite run {args.resume} started with "
                "(its SHA-256 differs); start a new run\n"
            )
            return 2
        if args.model and args.model != run["model"]:
            sys.stderr.write(f"error: run {args.resume} evaluates {run['model']!r}\n")
            return 2
        if args.adapter and args.adapter != run["registry_ref"]:
            sys.stderr.write(f"error: run {args.resume} evaluates {run['registry_ref']!r}\n")
            return 2
        registry_ref = run["registry_ref"]
        run_id, model, samples = run["id"], run["model"], run["samples"]
        overrides = run["params"].get("overrides", {})
        store.set_status(engine, run_id, "running")
    else:
        found = _target(engine, settings, args.model, args.adapter)
        if isinstance(found, str):
            sys.stderr.write(f"error: {found}\n")
            return 2
        model, registry_ref = found
        samples = args.samples
        if (
            samples > 1
            and suite.defaults.params.get("temperature", 0) == 0
            and not overrides.get("temperature")
        ):
            sys.stderr.write("note: several samples at temperature 0 are likely identical\n")
        run_id = store.create_run(
            engine,
            suite=suite.name,
            version=suite.version,
            sha256=sha,
            path=str(resolve_path(args.suite).resolve()),
            model=model,
            samples=samples,
            cases_total=len(suite.cases),
            params={"overrides": overrides, "concurrency": args.concurrency, "url": url},
            registry_ref=registry_ref,
        )
    what = f"{model} ({registry_ref})" if registry_ref else model
    sys.stderr.write(
        f"eval run {run_id}: {suite.name} on {what} via {url} (user={marker(run_id)})\n"
    )
    client = openai.AsyncOpenAI(
        base_url=url.rstrip("/") + "/v1", api_key=key, max_retries=2, timeout=args.timeout
    )

    async def go() -> tuple[int, int]:
        async with client:
            return await run_suite(
                engine, client, suite, run_id, model, samples, args.concurrency, overrides
            )

    try:
        _, failed = asyncio.run(go())
    except KeyboardInterrupt:
        store.set_status(engine, run_id, "interrupted")
        sys.stderr.write(
            f"\ninterrupted: resume with `bastion eval run {args.suite} --resume {run_id}`\n"
        )
        return 130
    except RunAborted as exc:
        store.set_status(engine, run_id, "failed")
        sys.stderr.write(f"error: {exc}\n")
        return 2
    left = store.attach_costs(engine, run_id, wait=3.0)
    status = "finished" if not failed else "incomplete"
    store.set_status(engine, run_id, status)
    if failed:
        sys.stderr.write(f"{failed} call(s) failed; `--resume {run_id}` asks them again\n")
    if left:
        sys.stderr.write(f"note: {left} result(s) without a cost (no price for the model?)\n")
    sys.stdout.write(run_id + "\n")
    return 0 if not failed else 3


def _target(
    engine: Any, settings: Any, alias: str | None, adapter: str | None
) -> tuple[str, str | None] | str:
    """(the alias to call, the registry version it serves) or why not. The version is looked
    up, never taken on trust: a gate counts the run as evidence about that version."""
    import re

    from bastion.evals.store import adapter_alias, served_ref

    if adapter is None:
        if not alias:
            return "--model ALIAS or --adapter NAME@VERSION is required (what to evaluate)"
        return alias, served_ref(engine, settings, alias)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$", adapter):
        return f"--adapter {adapter!r}: expected NAME@VERSION, e.g. legal@2"
    if alias is None:
        alias = adapter_alias(engine, adapter)
        if alias is None:
            return (
                f"adapter {adapter} is not deployed: deploy it for evaluation with "
                f"`bastion models deploy {adapter} --to ALIAS --staging`, then run again"
            )
    served = served_ref(engine, settings, alias)
    if served != adapter:
        return f"alias {alias!r} serves {served or 'no registry version'}, not {adapter}"
    return alias, adapter


def _summary(engine: Any, run_id: str) -> dict[str, Any] | None:
    from bastion.evals import compare, stats, store

    run = store.get_run(engine, run_id)
    if run is None:
        return None
    rows = store.results(engine, run_id)
    cases = compare.aggregate(rows, [run["samples"]])
    metrics: dict[str, float] = {}
    for name in sorted({m for c in cases.values() for m in c.metrics}):
        vals = [c.metrics[name] for c in cases.values() if name in c.metrics]
        metrics[name] = stats.mean(vals)
    return {
        **{k: (str(v) if k.endswith("_at") else v) for k, v in run.items()},
        "cases_done": len(cases),
        "metrics": metrics,
        "results": rows,
    }


def cmd_list(args: argparse.Namespace) -> int:
    from bastion.evals import store

    runs = store.list_runs(_engine(args), args.limit)
    if args.format == "json":
        sys.stdout.write(json.dumps(runs, indent=2, default=str) + "\n")
        return 0
    sys.stdout.write(
        f"{'run':<16} {'suite':<18} {'model':<16} {'status':<11} {'done':>9} {'pass':>6}  created\n"
    )
    for r in runs:
        total = r["cases_total"] * r["samples"]
        rate = f"{(r['passed'] or 0) / r['done']:.3f}" if r["done"] else "-"
        sys.stdout.write(
            f"{r['id']:<16} {r['suite'][:18]:<18} {r['model'][:16]:<16} {r['status']:<11} "
            f"{r['done'] or 0:>4}/{total:<4} {rate:>6}  {r['created_at']:%Y-%m-%d %H:%M}\n"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    s = _summary(_engine(args), args.run_id)
    if s is None:
        sys.stderr.write(f"error: no eval run {args.run_id!r}\n")
        return 2
    if args.format == "json":
        sys.stdout.write(json.dumps(s, indent=2, default=str) + "\n")
        return 0
    w = sys.stdout.write
    on = f"{s['model']} ({s['registry_ref']})" if s.get("registry_ref") else s["model"]
    w(f"run {s['id']}: suite {s['suite']} v{s['suite_version']} on {on}, {s['status']}\n")
    w(f"cases {s['cases_done']}/{s['cases_total']}, {s['samples']} sample(s) each\n")
    for k, v in s["metrics"].items():
        w(f"  {k:<28} {v:.6g}\n")
    if s["results"]:
        head = f"{'case#sample':<12} {'result':<5} {'ttft':>7} {'total':>7}"
        w(f"{head}     failed scorers / output (times in ms)\n")
    for r in s["results"]:
        mark = "ERROR" if r["error"] else ("pass" if r["passed"] else "FAIL")
        bad = [n for n, sc in r["scores"].items() if not sc["passed"] or sc["error"]]
        text = r["output"].replace("\n", " ")[:60]
        ttft = f"{r['ttft_ms']:>7.0f}" if r.get("ttft_ms") is not None else f"{'-':>7}"
        w(
            f"{r['case_id']}#{r['sample']:<2} {mark:<5} {ttft} {r['latency_ms']:>7.0f} ms  "
            f"{', '.join(bad) or '-':<24} {text}\n"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bastion.evals import report, stats
    from bastion.evals.compare import compare

    try:
        c = compare(
            _engine(args), args.run_a, args.run_b, args.level, args.resamples or stats.RESAMPLES
        )
    except (LookupError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    text = {"md": report.markdown, "json": report.as_json, "html": report.html}[args.format](c)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        sys.stderr.write(f"report written to {args.out}\n")
        if args.format != "md":
            sys.stdout.write(report.markdown(c))
    else:
        sys.stdout.write(text)
    worse = any(m.verdict == "worse" for m in c.metrics)
    return 1 if (worse and args.fail_on_worse) else 0
