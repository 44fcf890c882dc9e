"""The worked example of docs/evals.md, reproduced on real engines (issue 14).

Starts the tiny chat model and MiniLM on vLLM CPU, one `bastion serve` in front of them (the
test suite's own helpers: SQLite, audit on), a service key, then runs the `bastion eval`
commands the docs show and prints each with its output. Run from the repository root:

    .venv/bin/python -m bench.evals_demo [--out DIR]

DIR (default: a temporary directory) keeps the suite, the reports and the database.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

import yaml

from bastion.local.launcher import (
    EngineSpec,
    VllmProcess,
    embedding_model_dir,
    ensure_tiny_model,
    free_port,
)
from tests.conftest import EMBED, TINY, Gateway, base_config, engine_models

SUITE = {
    "name": "answers",
    "description": "does the model answer at all: a sentence, not a fragment",
    "defaults": {
        "params": {"temperature": 0, "max_tokens": 12},
        "scorers": [
            {"name": "regex", "params": {"pattern": r"(?s)\S.{7,}"}},
            {
                "name": "embedding_similarity",
                "params": {"model": "minilm", "threshold": 0.5},
                "gate": False,
            },
            {"name": "latency", "params": {"max": 5000}, "gate": False},
        ],
    },
    "cases": [
        {
            "id": f"q{i:02d}",
            "tags": [topic],
            "input": {"messages": [{"role": "user", "content": f"Explain {topic} briefly."}]},
            "expected": f"{topic} is a banking term.",
        }
        for i, topic in enumerate(
            ["IBAN", "SWIFT", "overdraft", "APR", "escrow", "SEPA", "chargeback", "KYC"] * 2
        )
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bastion-evals-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    chat = VllmProcess(
        EngineSpec(ensure_tiny_model(), TINY, free_port(), gpu_memory_utilization=0.05),
        log_path=work / "chat.log",
    )
    embed = VllmProcess(
        EngineSpec(embedding_model_dir(), EMBED, free_port(), gpu_memory_utilization=0.05),
        log_path=work / "embed.log",
    )
    gw = None
    try:
        chat.start()
        embed.start()
        chat.wait_ready(420)
        embed.wait_ready(420)
        cfg = base_config(
            f"sqlite:///{work / 'bastion.db'}",
            engine_models(chat, embed),
            prices={"tiny": {"prompt": 1.0, "completion": 2.0}},
        )
        cfg["teams"]["ml-evals"] = {"cost_center": "cc-1"}
        gw = Gateway(cfg, work).start()
        gw.wait_ready()
        key = gw.create_key("ml-evals", "--user", "svc-evals", "--name", "evals")
        suite = work / "answers.yaml"
        suite.write_text(yaml.safe_dump(SUITE, sort_keys=False))

        def sh(*argv: str) -> str:
            shown = ["bastion", *argv]
            for secret in (key, str(gw.config_path)):  # type: ignore[union-attr]
                shown = [a.replace(secret, "…") for a in shown]
            r = gw.cli(*argv)  # type: ignore[union-attr]
            print(f"$ {shlex.join(shown)}\n{r.stderr}{r.stdout}", flush=True)
            return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""

        common = ("--url", gw.url, "--key", key)
        a = sh("eval", "run", str(suite), "--model", "tiny", *common)
        b = sh("eval", "run", str(suite), "--model", "tiny", "--max-tokens", "1", *common)
        sh("eval", "list")
        sh("eval", "show", a)
        sh("eval", "compare", a, b)
        sh("eval", "compare", a, b, "--format", "html", "--out", str(work / "report.html"))
        print(f"# files in {work}")
    finally:
        if gw:
            gw.stop()
        chat.stop()
        embed.stop()


if __name__ == "__main__":
    main()
