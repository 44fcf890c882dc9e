"""Session fixtures for LoRA training: ONE training run of an adapter on the tiny model, shared by
every module that needs a trained adapter (training checks, adapter serving, eval gates).

Training runs as `bastion tune` subprocesses (the trainer runs under the engine venv); it needs
no engine, so it never waits for one, and the session engines can boot meanwhile.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.tuning.corpus import write_corpus

#: Hyperparameters that make the tiny model learn the corpus in ~120 steps.
HYPER = ("--lr", "3e-3", "--batch-size", "4", "--max-tokens", "64", "--rank", "8")
TRAINED_STEPS = 120


def tune(jobs_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`bastion tune ARGS` (with `--jobs-dir` where the subcommand takes one)."""
    r = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "tune", *args, "--jobs-dir", str(jobs_dir)]
        if args[0] not in ("data", "validate")
        else [sys.executable, "-m", "bastion.cli", "tune", *args],
        capture_output=True,
        text=True,
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="session")
def lora_dataset(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic corpus (tests/tuning/corpus.py) prepared as a training data set."""
    root = tmp_path_factory.mktemp("corpus")
    src = write_corpus(root / "src")
    tune(root, "data", str(src), "--out", str(root / "data"), "--tokenizer", str(tiny_model),
         "--max-tokens", "64", "--val-fraction", "0.25")  # fmt: skip
    return root / "data"


@pytest.fixture(scope="session")
def trained_adapter(
    tiny_model: Path, lora_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A LoRA adapter trained on `lora_dataset`, finished: its job id, the jobs directory and
    the adapter's directory. Read it, never change it: the whole session shares it."""
    jobs_dir = tmp_path_factory.mktemp("jobs")
    r = tune(jobs_dir, "run", "--base", str(tiny_model), "--data", str(lora_dataset), *HYPER,
             "--max-steps", str(TRAINED_STEPS), "--epochs", "100", "--eval-every", "20",
             "--wait")  # fmt: skip
    job_id = r.stdout.splitlines()[0]
    return {"id": job_id, "jobs": jobs_dir, "adapter": jobs_dir / job_id / "adapter"}
