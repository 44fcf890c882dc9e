"""`bastion tune data|run|status|logs|cancel|list|validate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fail(msg: str, code: int = 1) -> int:
    sys.stderr.write(f"error: {msg}\n")
    return code


def _report_lines(report: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in report:
        where = r.get("path") or f"line {r.get('line')}"
        if r["status"] == "used":
            red = ", ".join(f"{k}={n}" for k, n in sorted(r.get("redacted", {}).items()))
            dups = len(r.get("duplicates", []))
            lines.append(
                f"  used      {where}: {r.get('samples', 1)} sample(s)"
                + (f", redacted {red}" if red else "")
                + (f", {dups} duplicate chunk(s) dropped" if dups else "")
            )
        elif r["status"] == "invalid":
            lines.append(f"  invalid   {where}: {'; '.join(r['errors'])}")
        else:
            lines.append(f"  {r['status']:<9} {where}: {r.get('reason')}")
    return lines


def cmd_data(args: argparse.Namespace) -> int:
    from bastion.tuning.dataset import DataError, build_from_folder, build_from_jsonl

    src: Path = args.src
    try:
        if src.is_file():
            m = build_from_jsonl(
                src, args.out, args.tokenizer, max_tokens=args.max_tokens,
                val_fraction=args.val_fraction, seed=args.seed, allow_invalid=args.allow_invalid,
            )  # fmt: skip
        else:
            m = build_from_folder(
                src, args.out, args.tokenizer, max_tokens=args.max_tokens,
                val_fraction=args.val_fraction, seed=args.seed,
            )  # fmt: skip
    except (DataError, FileExistsError) as exc:
        for line in _report_lines(getattr(exc, "report", [])):
            sys.stderr.write(line + "\n")
        return _fail(str(exc))
    if args.json:
        _print_json(m)
        return 0
    print(f"dataset {args.out}  (data digest {m['data_digest']})")
    print("\n".join(_report_lines(m["report"])))
    red = ", ".join(f"{k}={n}" for k, n in m["redacted"].items()) or "nothing"
    print(
        f"samples: {m['samples_train']} train ({m['tokens_train']} tokens), "
        f"{m['samples_validation']} validation ({m['tokens_validation']} tokens); "
        f"duplicates dropped: {m['duplicates_exact']} exact, "
        f"{m['duplicates_normalised']} normalised; redacted: {red}"
    )
    return 0


#: Registry states a base may be trained from: validated (its files re-hashed, documented) or
#: approved. Training is not serving; the adapter gets its own approval.
TRAINABLE = ("validated", "approved")


def _base_path(value: str, config: str | None = None) -> Path:
    """A base model directory: a path, `tiny`, or a registry version NAME@VERSION (its recorded
    local path, only while its files still match the record)."""
    p = Path(value).expanduser()
    if p.is_dir():
        return p
    if value == "tiny":  # the project's locally generated test model
        from bastion.local.launcher import ensure_tiny_model

        return ensure_tiny_model()
    if "@" in value:
        from bastion.config import load_settings
        from bastion.core.errors import BastionError
        from bastion.identity.teams import open_store
        from bastion.registry.records import model_dir

        try:
            return model_dir(open_store(load_settings(config)), value, TRAINABLE)
        except BastionError as exc:
            raise SystemExit(f"error: base {value}: {exc.message}") from None
    raise SystemExit(f"error: base {value!r} is not a model directory nor NAME@VERSION")


def cmd_run(args: argparse.Namespace) -> int:
    from bastion.tuning import jobs

    try:
        if args.resume:
            st = jobs.resume(args.resume, args.jobs_dir)
            print(f"resumed {st['id']}")
            return 0
        if not args.base or not args.data:
            return _fail("--base and --data are required (or --resume JOB)", 2)
        job_id = jobs.submit(
            _base_path(args.base, args.config), args.data, out=args.out, root=args.jobs_dir,
            python=args.python, rank=args.rank, alpha=args.alpha, lr=args.lr,
            epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            max_tokens=args.max_tokens, checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every, seed=args.seed, threads=args.threads,
            quantize=args.quantize, lr_schedule=args.lr_schedule,
        )  # fmt: skip
    except jobs.JobError as exc:
        return _fail(str(exc))
    print(job_id)
    if args.wait:
        st = jobs.wait(job_id, args.jobs_dir, timeout=float("inf"))
        print(f"{st['state']}: {st.get('out') or st.get('error') or ''}")
        return 0 if st["state"] == "succeeded" else 1
    return 0


def _fmt_status(st: dict[str, Any]) -> str:
    parts = [f"{st['id']}  {st['state']}", f"step {st.get('step', 0)}/{st.get('total_steps', '?')}"]
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if st.get("val_loss") is not None:
        parts.append(f"val {st['val_loss']:.4f} (base {st.get('base_val_loss') or 0:.4f})")
    if st.get("eta_s"):
        parts.append(f"eta {st['eta_s']:.0f}s")
    if st.get("error"):
        parts.append(f"error: {st['error']}")
    if st.get("out") and st["state"] == "succeeded":
        parts.append(f"adapter {st['out']}")
    return "  ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    from bastion.tuning import jobs

    try:
        st = jobs.status(args.job, args.jobs_dir)
    except jobs.JobError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json({**st, "progress": jobs.progress(args.job, args.jobs_dir)})
    else:
        print(_fmt_status(st))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bastion.tuning import jobs

    for st in jobs.list_jobs(args.jobs_dir):
        print(_fmt_status(st))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from bastion.tuning import jobs

    try:
        for line in jobs.follow_log(args.job, args.jobs_dir, follow=args.follow):
            sys.stdout.write(line)
            sys.stdout.flush()
    except jobs.JobError as exc:
        return _fail(str(exc))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from bastion.tuning import jobs

    try:
        st = jobs.cancel(args.job, args.jobs_dir)
        if args.wait:
            st = jobs.wait(args.job, args.jobs_dir, timeout=600)
    except jobs.JobError as exc:
        return _fail(str(exc))
    print(_fmt_status(st))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from bastion.local.launcher import EngineError
    from bastion.tuning.validate import ValidationError, run_validation, validate_with_own_engine

    kw = {"prompts": args.prompt or None, "max_samples": args.max_samples}
    try:
        if args.engine_url:
            res = run_validation(args.adapter, args.engine_url.rstrip("/"), **kw)
        else:
            res = validate_with_own_engine(
                args.adapter, gpu_memory_utilization=args.gpu_memory_utilization, **kw
            )
    except (ValidationError, EngineError, OSError) as exc:  # OSError: engine unreachable
        return _fail(str(exc))
    _print_json(res)
    return 0 if res["passed"] else 1


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    # Jobs are files under --jobs-dir; only `run` reads the config (a registry base's path).
    jobs_opt = argparse.ArgumentParser(add_help=False)
    jobs_opt.add_argument(
        "--jobs-dir", type=Path, default=None,
        help="where jobs live (default $BASTION_TUNING_DIR or ~/.local/share/bastion/tuning)",
    )  # fmt: skip
    tune = sub.add_parser("tune", help="fine-tuning: datasets, LoRA training jobs, validation")
    t = tune.add_subparsers(dest="tune_cmd", required=True)

    s = t.add_parser("data", help="build a training set from a folder, or validate a JSONL file")
    s.add_argument("src", type=Path, help="a folder of text/Markdown/source files, or a .jsonl")
    s.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    s.add_argument("--tokenizer", type=Path, required=True, help="base model dir or tokenizer.json")
    s.add_argument("--max-tokens", type=int, default=512, help="max tokens per sample")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--allow-invalid", action="store_true", help="JSONL: drop invalid lines")
    s.add_argument("--json", action="store_true", help="print the manifest")
    s.set_defaults(func=cmd_data)

    s = t.add_parser(
        "run", parents=[jobs_opt, common], help="start a LoRA training job (background)"
    )
    s.add_argument(
        "--base", help="base model: a directory, `tiny`, or a registry version NAME@VERSION"
    )
    s.add_argument("--data", type=Path, help="dataset built by `bastion tune data`")
    s.add_argument("--out", type=Path, help="adapter directory (default JOB/adapter)")
    s.add_argument("--resume", metavar="JOB", help="continue a cancelled/failed job")
    s.add_argument("--python", help="ML venv python (default $BASTION_TUNING_PYTHON, engine venv)")
    s.add_argument("--rank", type=int)
    s.add_argument("--alpha", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--lr-schedule", choices=["constant", "linear"])
    s.add_argument("--epochs", type=int)
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--eval-every", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    s.add_argument("--quantize", choices=["auto", "none", "4bit"], help="4bit: QLoRA (CUDA)")
    s.add_argument("--wait", action="store_true", help="wait for the job to end")
    s.set_defaults(func=cmd_run)

    for name, func, helptext in (
        ("status", cmd_status, "state, step, loss, ETA"),
        ("logs", cmd_logs, "the training log"),
        ("cancel", cmd_cancel, "stop a job (it keeps a checkpoint; resume with run --resume)"),
    ):
        s = t.add_parser(name, parents=[jobs_opt], help=helptext)
        s.add_argument("job")
        s.set_defaults(func=func)
    t.choices["status"].add_argument("--json", action="store_true", help="with the loss curve")
    t.choices["logs"].add_argument("--follow", "-f", action="store_true")
    t.choices["cancel"].add_argument("--wait", action="store_true")
    s = t.add_parser("list", parents=[jobs_opt], help="all jobs")
    s.set_defaults(func=cmd_list)

    s = t.add_parser("validate", help="load an adapter into a real vLLM engine; update its card")
    s.add_argument("adapter", type=Path)
    s.add_argument("--engine-url", help="a running engine with runtime LoRA (default: start one)")
    s.add_argument("--prompt", action="append", help="a prompt to generate from (repeatable)")
    s.add_argument("--max-samples", type=int, default=64, help="held-out samples scored")
    s.add_argument(
        "--gpu-memory-utilization", type=float, default=0.05,
        help="for the engine validate starts (CPU: share of RAM for the KV cache)",
    )  # fmt: skip
    s.set_defaults(func=cmd_validate)
