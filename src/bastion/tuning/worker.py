"""The training process: LoRA with PEFT, run under the ML virtualenv as `python worker.py JOB_DIR`.

The gateway never imports this module (it needs torch, transformers and peft). It reads
`job.json`, trains, and reports only through files in the job directory, so a job outlives the
command that started it and any gateway restart:

- `state.json`   state, step, loss, ETA, error (atomic rewrites; `bastion tune status`)
- `progress.jsonl` one line per step (`loss`) and per evaluation (`val_loss`)
- `checkpoints/step-N/` adapter, optimizer and RNG state, every `checkpoint_every` steps and on
  cancel; `--resume` continues from the newest one
- the adapter directory (`out`), with `bastion-card.json`, written atomically at the end.

A `cancel` file in the job directory (or SIGTERM) stops it after the current step, with a
checkpoint. On a CUDA machine with bitsandbytes installed the base is loaded in 4-bit NF4
(QLoRA); that path is untested on the CPU-only machines this was built on.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# The ML venv does not have bastion installed: import its standard-library-only helpers by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bastion.tuning.files import dir_digests, read_json, write_json

CARD = "bastion-card.json"
_stop = False


def _on_term(*_: Any) -> None:
    global _stop
    _stop = True


class Job:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = read_json(root / "job.json")
        self.hp = self.spec["hyperparameters"]
        self.state: dict[str, Any] = read_json(root / "state.json")
        self._last_state = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.state.update(fields, updated=time.time())
        if force or time.monotonic() - self._last_state > 0.5:
            write_json(self.root / "state.json", self.state)
            self._last_state = time.monotonic()

    def record(self, **fields: Any) -> None:
        line = json.dumps({**fields, "t": round(time.time(), 3)})
        with (self.root / "progress.jsonl").open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)  # the log `bastion tune logs` shows

    def cancelled(self) -> bool:
        return _stop or (self.root / "cancel").exists()


def _encode(tok: Any, rec: dict[str, Any], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Token ids and labels; prompts (user/system turns, `prompt`) are not learnt (-100)."""
    if "messages" in rec:
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, m in enumerate(rec["messages"]):
            # Render one turn at a time so each turn's tokens are known to be its own; an
            # assistant turn's header is prompt (the engine writes it), its answer is learnt.
            head = tok.apply_chat_template(
                rec["messages"][:i], tokenize=False, add_generation_prompt=True
            ) if m["role"] == "assistant" else done  # fmt: skip
            text = tok.apply_chat_template(rec["messages"][: i + 1], tokenize=False)
            for piece, learn in ((head[len(done) :], False), (text[len(head) :], True)):
                part = tok(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids += part
                labels += part if learn and m["role"] == "assistant" else [-100] * len(part)
            done = text
    elif "prompt" in rec:
        p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(rec["completion"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            c = [*c, tok.eos_token_id]
        ids, labels = p + c, [-100] * len(p) + c
    else:
        ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
        labels = list(ids)
    truncated = len(ids) > max_tokens
    return ids[:max_tokens], labels[:max_tokens], truncated


def _load(path: Path, tok: Any, max_tokens: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    out, truncated = [], 0
    for line in path.read_text().splitlines():
        ids, labels, cut = _encode(tok, json.loads(line), max_tokens)
        truncated += cut
        if any(x != -100 for x in labels[1:]):
            out.append((ids, labels))
    return out, truncated


def _batch(torch: Any, items: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    n = max(len(i) for i, _ in items)
    ids = [i + [pad] * (n - len(i)) for i, _ in items]
    labels = [lab + [-100] * (n - len(lab)) for _, lab in items]
    mask = [[1] * len(i) + [0] * (n - len(i)) for i, _ in items]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def _eval_loss(torch: Any, model: Any, data: list[Any], pad: int, batch: int) -> float | None:
    """Token-weighted mean loss over the validation set (what `held-out loss` means here)."""
    if not data:
        return None
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            b = _batch(torch, data[i : i + batch], pad)
            n = int((b["labels"][:, 1:] != -100).sum())
            dev = next(model.parameters()).device
            total += float(model(**{k: v.to(dev) for k, v in b.items()}).loss) * n
            count += n
    model.train()
    return total / count if count else None


def _model(job: Job, torch: Any) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = job.spec["base"]["path"]
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    quant = job.hp.get("quantize", "auto")
    cuda = torch.cuda.is_available()
    try:
        import bitsandbytes  # noqa: F401

        has_bnb = True
    except ImportError:
        has_bnb = False
    if quant == "4bit" and not (cuda and has_bnb):
        raise RuntimeError("quantize=4bit needs CUDA and bitsandbytes")
    if cuda and has_bnb and quant in ("auto", "4bit"):
        # QLoRA: frozen 4-bit NF4 base, bf16 compute, LoRA weights in full precision.
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=q, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        return model, tok, "cuda-qlora-4bit"
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are slow and lossy
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    return model, tok, f"{device}-lora-{str(dtype).removeprefix('torch.')}"


def _checkpoint(
    job: Job, torch: Any, model: Any, opt: Any, step: int, extra: dict[str, Any]
) -> None:
    root = job.root / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    if final.exists():
        return
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
    write_json(tmp / "trainer_state.json", {"step": step, **extra})
    os.rename(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(job: Job) -> Path | None:
    root = job.root / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def train(job: Job) -> None:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    hp = job.hp
    torch.set_num_threads(int(hp.get("threads") or 1))
    torch.manual_seed(hp["seed"])
    model, tok, device = _model(job, torch)
    cfg = LoraConfig(
        r=hp["rank"],
        lora_alpha=hp["alpha"],
        lora_dropout=hp["dropout"],
        target_modules=hp["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    dev = next(model.parameters()).device
    data = Path(job.spec["data"]["path"])
    train_set, cut_t = _load(data / "train.jsonl", tok, hp["max_tokens"])
    val_set, cut_v = _load(data / "validation.jsonl", tok, hp["max_tokens"])
    if not train_set:
        raise RuntimeError("no training sample has a token to learn")
    per_epoch = math.ceil(len(train_set) / hp["batch_size"])
    total = per_epoch * hp["epochs"]
    if hp.get("max_steps"):
        total = min(total, hp["max_steps"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 1.0 - s / total) if hp["lr_schedule"] == "linear" else (lambda s: 1.0)
    )
    pad = tok.pad_token_id

    def evaluate() -> float | None:
        if not val_set:
            return None
        return _eval_loss(torch, model, val_set, pad, hp["batch_size"])

    step, curves = 0, {"train": [], "validation": []}
    base_val: float | None = None
    ckpt = _latest_checkpoint(job)
    if ckpt is not None:
        st = read_json(ckpt / "trainer_state.json")
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt"))
        torch.set_rng_state(torch.load(ckpt / "torch_rng.pt"))
        step, curves, base_val = st["step"], st["curves"], st["base_val_loss"]
        for _ in range(step):
            sched.step()
        job.record(event="resumed", step=step, checkpoint=ckpt.name)
    else:
        with model.disable_adapter():
            base_val = evaluate()
        job.record(event="start", step=0, val_loss=base_val, base=True)
    job.update(
        force=True, state="running", device=device, total_steps=total, step=step,
        samples_train=len(train_set), samples_validation=len(val_set),
        truncated=cut_t + cut_v, base_val_loss=base_val,
    )  # fmt: skip
    started, first = time.monotonic(), step
    prior = float(job.state.get("train_seconds") or 0.0)
    model.train()
    while step < total and not job.cancelled():
        epoch = step // per_epoch
        order = list(range(len(train_set)))
        random.Random(hp["seed"] * 1000 + epoch).shuffle(order)
        i = (step % per_epoch) * hp["batch_size"]
        b = _batch(torch, [train_set[j] for j in order[i : i + hp["batch_size"]]], pad)
        loss = model(**{k: v.to(dev) for k, v in b.items()}).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.monotonic() - started
        eta = elapsed / (step - first) * (total - step)
        curves["train"].append([step, round(float(loss), 5)])
        job.record(step=step, epoch=epoch, loss=float(loss), lr=sched.get_last_lr()[0], eta_s=eta)
        job.update(step=step, epoch=epoch, loss=float(loss), eta_s=round(eta, 1),
                   train_seconds=round(prior + elapsed, 2))  # fmt: skip
        if step % hp["eval_every"] == 0 or step == total:
            vl = evaluate()
            if vl is not None:
                curves["validation"].append([step, round(vl, 5)])
                job.record(step=step, val_loss=vl)
                job.update(val_loss=vl)
        if step % hp["checkpoint_every"] == 0 and step < total:
            _checkpoint(job, torch, model, opt, step, {"curves": curves, "base_val_loss": base_val})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    job.update(train_seconds=round(prior + time.monotonic() - started, 2), peak_rss_bytes=peak)
    if step < total:  # cancelled
        _checkpoint(job, torch, model, opt, step, {"curves": curves, "base_val_loss": base_val})
        job.record(event="cancelled", step=step)
        job.update(force=True, state="cancelled", eta_s=None)
        return
    out = Path(job.spec["out"])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    card = {
        "card_version": 1,
        "kind": "adapter",
        "format": "peft-lora",
        "job": job.spec["id"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": job.spec["base"],
        "data": job.spec["data"],
        "hyperparameters": hp,
        "training": {
            "device": device,
            "steps": step,
            "epochs": round(step / per_epoch, 3),
            "samples_train": len(train_set),
            "samples_validation": len(val_set),
            "truncated_samples": cut_t + cut_v,
            "seconds": job.state["train_seconds"],
            "peak_rss_bytes": peak,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            "base_val_loss": base_val,
            "final_val_loss": curves["validation"][-1][1] if curves["validation"] else None,
            "libraries": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        },
        "curves": curves,
        "files": dir_digests(tmp),
        "validation": None,
    }
    write_json(tmp / CARD, card)
    if out.exists():
        raise RuntimeError(f"{out} appeared while training; the adapter is left in {tmp}")
    os.rename(tmp, out)
    job.record(event="finished", step=step, out=str(out))
    job.update(force=True, state="succeeded", eta_s=0, out=str(out), finished=time.time())


def main(argv: list[str]) -> int:
    job = Job(Path(argv[1]).resolve())
    signal.signal(signal.SIGTERM, _on_term)
    job.update(force=True, state="running", started=time.time(), error=None)
    try:
        train(job)
    except Exception as exc:
        traceback.print_exc()
        job.update(force=True, state="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
