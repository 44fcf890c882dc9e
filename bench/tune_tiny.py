"""Measure LoRA training on the tiny model on this machine (numbers for docs/fine-tuning.md).

    PYTHONPATH=src python bench/tune_tiny.py [--docs 200] [--max-tokens 512] [--steps 50]

Builds a synthetic corpus, a dataset, runs one `bastion tune run` job to the end and prints the
card's time and peak memory, plus the worker's start-up (imports, model load) before step 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bastion.local.launcher import ensure_tiny_model
from bastion.tuning import jobs
from bastion.tuning.dataset import build_from_folder

_LINES = (
    "Project Zephyrine is owned by Marta Kowalczyk.",
    "The Zephyrine ledger runs in the Quillon data centre.",
    "Every change needs a ticket and a second reviewer.",
    "The nightly batch closes the books at midnight.",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    base = ensure_tiny_model()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "src").mkdir()
        for i in range(a.docs):
            # Long, distinct documents, so that samples fill max_tokens.
            body = "\n".join(f"{i}.{k}: {_LINES[(i + k) % 4]}" for k in range(a.max_tokens // 8))
            (root / "src" / f"doc-{i}.md").write_text(body + "\n")
        m = build_from_folder(root / "src", root / "data", base, max_tokens=a.max_tokens)
        job = jobs.submit(
            base, root / "data", root=root / "jobs", max_tokens=a.max_tokens,
            batch_size=a.batch_size, max_steps=a.steps, epochs=100, lr=1e-3,
            eval_every=a.steps, checkpoint_every=10**6, threads=a.threads,
        )  # fmt: skip
        st = jobs.wait(job, root / "jobs", timeout=3600)
        assert st["state"] == "succeeded", st
        card = json.loads((Path(st["out"]) / "bastion-card.json").read_text())
        prog = jobs.progress(job, root / "jobs")
        first = next(p["t"] for p in prog if p.get("step") == 1 and "loss" in p)
        t = card["training"]
        tokens = a.steps * a.batch_size * a.max_tokens
        print(json.dumps({
            "samples": m["samples_train"], "max_tokens": a.max_tokens, "batch": a.batch_size,
            "steps": a.steps, "threads": a.threads, "train_seconds": t["seconds"],
            "seconds_per_step": round(t["seconds"] / a.steps, 3),
            "tokens_per_second": round(tokens / t["seconds"]),
            "startup_seconds": round(first - st["started"], 1),
            "peak_rss_mib": round(t["peak_rss_bytes"] / 2**20),
            "val_loss": [t["base_val_loss"], t["final_val_loss"]],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
