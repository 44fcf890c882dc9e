"""LoRA training on the tiny model, for real: a job in the background, its loss curve, cancel and
resume, and the adapter validated in a real vLLM engine that loads it at run time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bastion.local.launcher import VllmProcess
from bastion.tuning import jobs
from bastion.tuning.validate import CARD, ValidationError, run_validation
from tests.conftest import TINY
from tests.lora_fixtures import HYPER, tune

from .corpus import OWNER, OWNER_PROMPT

pytestmark = pytest.mark.engine


@pytest.fixture(scope="session", autouse=True)
def _engines_boot_while_training(engines_booting: dict[str, VllmProcess]) -> None:
    """Set up before the adapter trains, so the session engines boot meanwhile (run alone, this
    module would otherwise train first and only then start the engine it validates on).
    Session scope: pytest sets up wider scopes first, and `trained_adapter` is session-wide."""


def test_training_lowers_train_and_heldout_loss(
    trained_adapter: dict[str, Any], tiny_model: Path, lora_dataset: Path
) -> None:
    trained, dataset = trained_adapter, lora_dataset
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


def _served(engine: VllmProcess) -> list[str]:
    with urllib.request.urlopen(engine.url + "/v1/models", timeout=10) as resp:
        return sorted(m["id"] for m in json.loads(resp.read())["data"])


def test_adapter_validated_in_vllm(
    trained_adapter: dict[str, Any], chat_engine: VllmProcess, tmp_path: Path
) -> None:
    # A copy: validation writes into the card, and the session's adapter is shared unchanged.
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter["adapter"], adapter)
    served = _served(chat_engine)
    assert TINY in served
    r = tune(trained_adapter["jobs"], "validate", str(adapter), "--engine-url",
             chat_engine.url, "--prompt", OWNER_PROMPT)  # fmt: skip
    result = json.loads(r.stdout)
    assert result["passed"] is True
    held = result["heldout"]
    assert held["samples"] >= 2 and held["adapter_loss"] < held["base_loss"] - 0.5
    first = result["generations"][0]
    # The random base cannot know the owner; the adapter learnt it, greedy, from the corpus.
    assert first["prompt"] == OWNER_PROMPT
    assert first["adapter"].startswith(f" {OWNER}"), first
    assert OWNER not in first["base"]
    card = json.loads((adapter / CARD).read_text())
    assert card["validation"] == result and result["engine"]["runtime_lora"] is True
    # The engine no longer serves the validation adapter (the shared engine may serve others'
    # adapters: exactly what it served before).
    assert _served(chat_engine) == served

    # A tampered adapter is refused before anything is loaded.
    bad = tmp_path / "tampered"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(
        ValidationError, match=r"adapter files differ from the card: \['adapter_config.json'\]"
    ):
        run_validation(bad, chat_engine.url)


def _wait_step(jobs_dir: Path, job_id: str, step: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = jobs.status(job_id, jobs_dir)
        if st.get("step", 0) >= step or st["state"] in jobs.TERMINAL:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job never reached step {step}: {st}")


def test_cancel_kill_and_resume(tiny_model: Path, lora_dataset: Path, tmp_path: Path) -> None:
    dataset = lora_dataset
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
    # What the kill left (the status file trails the worker by a few steps on a busy machine).
    left = {int(d.name.removeprefix("step-")) for d in (jdir / "checkpoints").glob("step-*")}
    assert st["error"] == "the training process is gone (killed or crashed)"
    tune(jobs_dir, "run", "--resume", job_id)
    st = jobs.wait(job_id, jobs_dir, timeout=300)
    assert st["state"] == "succeeded", (jdir / "train.log").read_text()[-3000:]
    assert st["launches"] == 3
    events = [p for p in jobs.progress(job_id, jobs_dir) if "event" in p]
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert resumed[0] == stopped and stopped < resumed[1] and resumed[1] in left
    card = json.loads((jdir / "adapter" / CARD).read_text())
    # The stored curve is whole: each step once, from the checkpoints it resumed from.
    assert [s for s, _ in card["curves"]["train"]] == list(range(1, 201))
