"""LoRA training on the tiny model, for real: a job in the background, its loss curve, cancel and
resume, and the adapter validated in a real vLLM engine that loads it at run time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.local.launcher import EngineSpec, VllmProcess, free_port
from bastion.tuning import jobs
from bastion.tuning.validate import CARD, ValidationError, run_validation

from .corpus import OWNER, OWNER_PROMPT, write_corpus

pytestmark = pytest.mark.engine

HYPER = ("--lr", "3e-3", "--batch-size", "4", "--max-tokens", "64", "--rank", "8")


def tune(jobs_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
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


@pytest.fixture(scope="module")
def engine_booting(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmProcess]:
    """A vLLM engine with runtime LoRA loading, booting while the adapter trains."""
    spec = EngineSpec(
        tiny_model, "tiny-base", free_port(), gpu_memory_utilization=0.05, max_model_len=2048,
        extra_args=("--enable-lora", "--max-lora-rank", "8"),
    )  # fmt: skip
    log = tmp_path_factory.mktemp("lora-engine") / "vllm.log"
    proc = VllmProcess(spec, log_path=log, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dataset(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    src = write_corpus(root / "src")
    tune(root, "data", str(src), "--out", str(root / "data"), "--tokenizer", str(tiny_model),
         "--max-tokens", "64", "--val-fraction", "0.25")  # fmt: skip
    return root / "data"


@pytest.fixture(scope="module")
def trained(
    engine_booting: VllmProcess,
    tiny_model: Path,
    dataset: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    jobs_dir = tmp_path_factory.mktemp("jobs")
    r = tune(jobs_dir, "run", "--base", str(tiny_model), "--data", str(dataset), *HYPER,
             "--max-steps", "120", "--epochs", "100", "--eval-every", "20", "--wait")  # fmt: skip
    job_id = r.stdout.splitlines()[0]
    adapter = jobs_dir / job_id / "adapter"
    return {"id": job_id, "jobs": jobs_dir, "adapter": adapter}


def test_training_lowers_train_and_heldout_loss(
    trained: dict[str, Any], tiny_model: Path, dataset: Path
) -> None:
    card = json.loads((trained["adapter"] / CARD).read_text())
    train = [loss for _, loss in card["curves"]["train"]]
    assert len(train) == 120 == card["training"]["steps"]
    assert sum(train[-10:]) / 10 < train[0] - 1.0  # the loss falls
    t = card["training"]
    val = card["curves"]["validation"]
    assert [s for s, _ in val] == [20, 40, 60, 80, 100, 120]
    assert t["final_val_loss"] == val[-1][1] < t["base_val_loss"] - 0.5  # held-out, too
    assert card["base"]["digest"] == jobs.describe_base(tiny_model)["digest"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert card["data"]["digest"] == manifest["data_digest"]
    assert card["hyperparameters"]["rank"] == 8 and card["hyperparameters"]["lr"] == 3e-3
    assert t["seconds"] > 0 and t["peak_rss_bytes"] > 50 * 2**20
    assert card["validation"] is None
    # Job state is files: a fresh process (as after a gateway restart) reads it.
    st = tune(trained["jobs"], "status", trained["id"]).stdout
    assert "succeeded" in st and "step 120/120" in st
    full = json.loads(tune(trained["jobs"], "status", trained["id"], "--json").stdout)
    assert [p["step"] for p in full["progress"] if "loss" in p] == list(range(1, 121))
    assert '"event": "finished"' in tune(trained["jobs"], "logs", trained["id"]).stdout


@pytest.fixture(scope="module")
def lora_engine(engine_booting: VllmProcess) -> VllmProcess:
    engine_booting.wait_ready(timeout=600)
    return engine_booting


def test_adapter_validated_in_vllm(
    trained: dict[str, Any], lora_engine: VllmProcess, tmp_path: Path
) -> None:
    r = tune(trained["jobs"], "validate", str(trained["adapter"]), "--engine-url",
             lora_engine.url, "--prompt", OWNER_PROMPT)  # fmt: skip
    result = json.loads(r.stdout)
    assert result["passed"] is True
    held = result["heldout"]
    assert held["samples"] >= 2 and held["adapter_loss"] < held["base_loss"] - 0.5
    first = result["generations"][0]
    # The random base cannot know the owner; the adapter learnt it, greedy, from the corpus.
    assert first["prompt"] == OWNER_PROMPT
    assert first["adapter"].startswith(f" {OWNER}"), first
    assert OWNER not in first["base"]
    card = json.loads((trained["adapter"] / CARD).read_text())
    assert card["validation"] == result and result["engine"]["runtime_lora"] is True
    # The engine no longer serves the validation adapter.
    with __import__("urllib.request").request.urlopen(lora_engine.url + "/v1/models") as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny-base"]

    # A tampered adapter is refused before anything is loaded.
    bad = tmp_path / "tampered"
    shutil.copytree(trained["adapter"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(
        ValidationError, match=r"adapter files differ from the card: \['adapter_config.json'\]"
    ):
        run_validation(bad, lora_engine.url)


def _wait_step(jobs_dir: Path, job_id: str, step: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = jobs.status(job_id, jobs_dir)
        if st.get("step", 0) >= step or st["state"] in jobs.TERMINAL:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job never reached step {step}: {st}")


def test_cancel_kill_and_resume(
    trained: dict[str, Any], tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    jobs_dir = tmp_path / "jobs"
    r = tune(jobs_dir, "run", "--base", str(tiny_model), "--data", str(dataset), *HYPER,
             "--max-steps", "200", "--epochs", "100", "--checkpoint-every", "10",
             "--eval-every", "100")  # fmt: skip
    job_id = r.stdout.strip()
    jdir = jobs_dir / job_id
    assert _wait_step(jobs_dir, job_id, 12)["state"] == "running"
    out = tune(jobs_dir, "cancel", job_id, "--wait").stdout
    assert "cancelled" in out
    stopped = jobs.status(job_id, jobs_dir)["step"]
    assert 12 <= stopped < 200
    assert (jdir / f"checkpoints/step-{stopped:07d}/adapter_model.safetensors").is_file()
    assert not (jdir / "adapter").exists()
    assert tune(jobs_dir, "cancel", job_id, check=False).stderr.endswith("is already cancelled\n")

    # Resume; then the worker dies without warning (SIGKILL) and is resumed again.
    tune(jobs_dir, "run", "--resume", job_id)
    st = _wait_step(jobs_dir, job_id, stopped + 25)
    assert st["state"] == "running"
    os.kill(st["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (st := jobs.status(job_id, jobs_dir))["state"] != "failed":
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert st["error"] == "the training process is gone (killed or crashed)"
    tune(jobs_dir, "run", "--resume", job_id)
    st = jobs.wait(job_id, jobs_dir, timeout=300)
    assert st["state"] == "succeeded", (jdir / "train.log").read_text()[-3000:]
    assert st["launches"] == 3
    events = [p for p in jobs.progress(job_id, jobs_dir) if "event" in p]
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert resumed[0] == stopped and stopped < resumed[1] <= stopped + 30
    card = json.loads((jdir / "adapter" / CARD).read_text())
    # The stored curve is whole: each step once, from the checkpoints it resumed from.
    assert [s for s, _ in card["curves"]["train"]] == list(range(1, 201))
