"""Training jobs, managed from the gateway side: files on disk, one directory per job.

A job is `job.json` (what to train), `state.json` (written by the worker), `progress.jsonl`,
`train.log` and `checkpoints/`. Nothing lives in memory, so `status`, `logs`, `cancel` and
`--resume` work from any process, before or after a gateway restart. The worker runs under the
ML virtualenv (`--python`, `$BASTION_TUNING_PYTHON`, or the engine venv), in its own session so
that it outlives the command that launched it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bastion.tuning.dataset import DataError, load_manifest
from bastion.tuning.files import combined_digest, dir_digests, read_json, write_json

WORKER = Path(__file__).resolve().parent / "worker.py"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: Attention projections and the MLP: what the LoRA recipes in docs/fine-tuning.md adapt.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS: dict[str, Any] = {
    "rank": 8,
    "alpha": 16,
    "dropout": 0.0,
    "lr": 2e-4,
    "lr_schedule": "constant",
    "epochs": 1,
    "max_steps": None,
    "batch_size": 4,
    "max_tokens": 512,
    "target_modules": list(DEFAULT_TARGETS),
    "seed": 0,
    "checkpoint_every": 50,
    "eval_every": 25,
    "threads": 1,
    "quantize": "auto",
}
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONUNBUFFERED": "1",
}


class JobError(Exception):
    """A request about a job that cannot be honoured (unknown id, wrong state, bad input)."""


def jobs_root(override: Path | None = None) -> Path:
    if override is not None:
        return override
    env = os.environ.get("BASTION_TUNING_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "bastion" / "tuning"


def ml_python(override: str | None = None) -> str:
    if override:
        return override
    if env := os.environ.get("BASTION_TUNING_PYTHON"):
        return env
    from bastion.local.launcher import engine_python

    return str(engine_python())


def describe_base(path: Path) -> dict[str, Any]:
    """Per-file SHA-256 of a local base model and one digest over them (what the registry
    records as the base's identity)."""
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise JobError(f"{path} is not a model directory (no config.json)")
    if not (path / "tokenizer.json").is_file():
        raise JobError(f"{path} has no tokenizer.json")
    files = dir_digests(path)
    return {"path": str(path), "name": path.name, "files": files, "digest": combined_digest(files)}


def submit(
    base: Path,
    data: Path,
    *,
    out: Path | None = None,
    root: Path | None = None,
    python: str | None = None,
    **hyper: Any,
) -> str:
    """Create a job and launch its worker; return the job id."""
    unknown = set(hyper) - set(DEFAULTS)
    if unknown:
        raise JobError(f"unknown hyperparameters: {sorted(unknown)}")
    hp = {**DEFAULTS, **{k: v for k, v in hyper.items() if v is not None}}
    for k in ("rank", "alpha", "epochs", "batch_size", "max_tokens", "checkpoint_every"):
        if int(hp[k]) < 1:
            raise JobError(f"{k} must be at least 1")
    if not 0 < float(hp["lr"]) < 1:
        raise JobError("lr must be between 0 and 1")
    base_info = describe_base(base)
    try:
        manifest = load_manifest(data)
    except DataError as exc:
        raise JobError(str(exc)) from exc
    if manifest["tokenizer_sha256"] != base_info["files"]["tokenizer.json"]:
        raise JobError("the dataset was chunked with another tokenizer than this base model's")
    job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    jdir = jobs_root(root) / job_id
    out = (out or jdir / "adapter").resolve()
    if out.exists():
        raise JobError(f"{out} already exists")
    jdir.mkdir(parents=True)
    spec = {
        "id": job_id,
        "created": time.time(),
        "base": base_info,
        "data": {
            "path": str(data.resolve()),
            "digest": manifest["data_digest"],
            "samples_train": manifest["samples_train"],
            "samples_validation": manifest["samples_validation"],
            "redacted": manifest["redacted"],
        },
        "out": str(out),
        "hyperparameters": hp,
        "python": ml_python(python),
    }
    write_json(jdir / "job.json", spec)
    write_json(jdir / "state.json", {"state": "queued", "step": 0, "launches": 0})
    _launch(jdir)
    return job_id


def _launch(jdir: Path) -> None:
    spec = read_json(jdir / "job.json")
    state = read_json(jdir / "state.json")
    # Written before the worker starts: its own "running" must never be overwritten.
    (jdir / "worker.pid").unlink(missing_ok=True)
    state.update(state="queued", error=None, launches=int(state.get("launches", 0)) + 1)
    write_json(jdir / "state.json", state)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(_OFFLINE_ENV)
    with (jdir / "train.log").open("ab") as log:
        proc = subprocess.Popen(
            [spec["python"], str(WORKER), str(jdir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=jdir,
            start_new_session=True,  # survives the CLI and a gateway restart; own process group
        )
    (jdir / "worker.pid").write_text(f"{proc.pid} {_start_time(proc.pid)}")


def _worker(jdir: Path) -> tuple[int, str | None] | None:
    try:
        pid, start = (jdir / "worker.pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), start


def job_dir(job_id: str, root: Path | None = None) -> Path:
    jdir = jobs_root(root) / job_id
    if "/" in job_id or not (jdir / "job.json").is_file():
        raise JobError(f"no tuning job {job_id!r} under {jobs_root(root)}")
    return jdir


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    if there is no such live process: a pid plus its start time names one process for ever."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(worker: tuple[int, str | None] | None) -> bool:
    """The worker still runs (a recycled pid running something else does not count)."""
    return worker is not None and _start_time(worker[0]) == worker[1]


def status(job_id: str, root: Path | None = None) -> dict[str, Any]:
    jdir = job_dir(job_id, root)
    state = read_json(jdir / "state.json")
    worker = _worker(jdir)
    launching = state["state"] == "queued" and worker is None  # between the two writes
    if state["state"] not in TERMINAL and not launching and not _alive(worker):
        # Re-read: the worker may have finished between the two reads.
        state = read_json(jdir / "state.json")
        if state["state"] not in TERMINAL and not _alive(worker):
            state.update(state="failed", error="the training process is gone (killed or crashed)")
            write_json(jdir / "state.json", state)
    if state["state"] not in TERMINAL and (jdir / "cancel").exists():
        state["state"] = "cancelling"
    return {"id": job_id, **state, "pid": worker[0] if worker else None}


def list_jobs(root: Path | None = None) -> list[dict[str, Any]]:
    r = jobs_root(root)
    if not r.is_dir():
        return []
    return [status(p.name, root) for p in sorted(r.iterdir()) if (p / "job.json").is_file()]


def cancel(job_id: str, root: Path | None = None) -> dict[str, Any]:
    jdir = job_dir(job_id, root)
    st = status(job_id, root)
    if st["state"] in TERMINAL:
        raise JobError(f"job {job_id} is already {st['state']}")
    (jdir / "cancel").touch()
    worker = _worker(jdir)
    if worker and _alive(worker):
        os.kill(worker[0], signal.SIGTERM)  # the worker checkpoints and stops after this step
    return status(job_id, root)


def resume(job_id: str, root: Path | None = None) -> dict[str, Any]:
    """Relaunch a cancelled or failed job from its newest checkpoint (or from the start)."""
    jdir = job_dir(job_id, root)
    st = status(job_id, root)
    if st["state"] not in ("cancelled", "failed"):
        raise JobError(f"job {job_id} is {st['state']}; only cancelled or failed jobs resume")
    (jdir / "cancel").unlink(missing_ok=True)
    _launch(jdir)
    return status(job_id, root)


def wait(job_id: str, root: Path | None = None, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(job_id, root)
        if st["state"] in TERMINAL or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def follow_log(job_id: str, root: Path | None = None, follow: bool = False) -> Iterator[str]:
    """The worker's log; with `follow`, new lines until the job ends."""
    jdir = job_dir(job_id, root)
    with (jdir / "train.log").open("r", errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                yield line
                continue
            if not follow or status(job_id, root)["state"] in TERMINAL:
                yield from f.readlines()
                return
            time.sleep(0.2)


def progress(job_id: str, root: Path | None = None) -> list[dict[str, Any]]:
    import json

    path = job_dir(job_id, root) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
