"""Validate an adapter in a real vLLM engine and record the result in its model card.

The adapter is loaded at run time (`POST /v1/load_lora_adapter`, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora --max-lora-rank R` on the engine),
exactly as a deployment will load it. Then, on the same engine:

- held-out loss: the validation samples are scored by the engine itself (`prompt_logprobs`) under
  the base model and under the adapter: mean negative log-likelihood per token, first token
  excluded (nothing predicts it);
- sample generations, greedy, base and adapter side by side.

Either an existing engine (`engine_url`) is used, or one is started for the base model and
stopped afterwards. Before anything is loaded, the adapter's files and the base model's files
are checked against the digests in the card: a tampered adapter is never validated.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bastion.tuning.files import combined_digest, dir_digests, read_json, write_json

CARD = "bastion-card.json"
#: vLLM accepts these LoRA ranks for --max-lora-rank.
_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class ValidationError(Exception):
    pass


def load_card(adapter: Path) -> dict[str, Any]:
    try:
        card = read_json(adapter / CARD)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{adapter} has no readable {CARD}: {exc}") from exc
    return card


def verify_files(adapter: Path, card: dict[str, Any]) -> None:
    """The adapter and its base are byte for byte what the card says they are."""
    now = dir_digests(adapter, exclude=frozenset({CARD}))
    if now != card["files"]:
        changed = sorted(set(now.items()) ^ set(card["files"].items()))
        raise ValidationError(
            f"adapter files differ from the card: {sorted({n for n, _ in changed})}"
        )
    base = Path(card["base"]["path"])
    if not base.is_dir():
        raise ValidationError(f"base model {base} is missing")
    if combined_digest(dir_digests(base)) != card["base"]["digest"]:
        raise ValidationError(f"base model {base} differs from the digest in the card")


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(errors="replace"), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def _ok(url: str, body: dict[str, Any]) -> Any:
    status, data = _post(url, body)
    if status != 200:
        raise ValidationError(f"POST {url} answered {status}: {str(data)[:500]}")
    return data


def _token_ids(engine: str, model: str, rec: dict[str, Any]) -> list[int]:
    """The sample as the engine tokenises it (chat records through the model's template)."""
    if "messages" in rec:
        body: dict[str, Any] = {"model": model, "messages": rec["messages"]}
    else:
        text = rec["text"] if "text" in rec else rec["prompt"] + rec["completion"]
        body = {"model": model, "prompt": text, "add_special_tokens": False}
    return list(_ok(engine + "/tokenize", body)["tokens"])


def _nll(engine: str, model: str, ids: list[int]) -> tuple[float, int]:
    data = _ok(
        engine + "/v1/completions",
        {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
    )
    per_token = data["choices"][0]["prompt_logprobs"]
    total = 0.0
    for tid, entry in zip(ids[1:], per_token[1:], strict=True):
        total -= entry[str(tid)]["logprob"]
    return total, len(ids) - 1


def _generate(engine: str, model: str, prompt: str, max_tokens: int) -> str:
    data = _ok(
        engine + "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )
    return str(data["choices"][0]["text"])


def served_base(engine: str) -> str:
    with urllib.request.urlopen(engine + "/v1/models", timeout=10) as r:
        models = json.loads(r.read())["data"]
    roots = [m for m in models if m.get("parent") is None]
    if not roots:
        raise ValidationError(f"{engine} serves no base model")
    return str(roots[0]["id"])


def run_validation(
    adapter: Path,
    engine: str,
    *,
    base_name: str | None = None,
    prompts: list[str] | None = None,
    max_samples: int = 64,
    gen_samples: int = 3,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Validate on a running engine (LoRA enabled) and write the result into the card."""
    adapter = adapter.resolve()
    card = load_card(adapter)
    verify_files(adapter, card)
    base = base_name or served_base(engine)
    lora = f"bastion-validate-{secrets.token_hex(4)}"
    data = Path(card["data"]["path"])
    val_path = data / "validation.jsonl"
    records = [json.loads(x) for x in val_path.read_text().splitlines() if x.strip()][:max_samples]
    _ok(engine + "/v1/load_lora_adapter", {"lora_name": lora, "lora_path": str(adapter)})
    try:
        losses = {"base": [0.0, 0], "adapter": [0.0, 0]}
        for rec in records:
            ids = _token_ids(engine, base, rec)
            if len(ids) < 2:
                continue
            for key, model in (("base", base), ("adapter", lora)):
                nll, n = _nll(engine, model, ids)
                losses[key][0] += nll
                losses[key][1] += n
        gens = []
        texts = list(prompts or [])
        for rec in records[:gen_samples]:
            if "text" in rec:  # the first half of a held-out sample
                words = rec["text"].split(" ")
                texts.append(" ".join(words[: max(1, len(words) // 2)]))
            elif "prompt" in rec:
                texts.append(rec["prompt"])
        for text in texts:
            gens.append(
                {
                    "prompt": text,
                    "base": _generate(engine, base, text, max_new_tokens),
                    "adapter": _generate(engine, lora, text, max_new_tokens),
                }
            )
    finally:
        _post(engine + "/v1/unload_lora_adapter", {"lora_name": lora})
    tokens = losses["base"][1]
    base_loss = losses["base"][0] / tokens if tokens else None
    adapter_loss = losses["adapter"][0] / tokens if tokens else None
    try:
        with urllib.request.urlopen(engine + "/version", timeout=5) as r:
            version = json.loads(r.read()).get("version")
    except (OSError, ValueError):
        version = None
    result = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {"kind": "vllm", "version": version, "runtime_lora": True},
        "heldout": {
            "samples": len(records),
            "tokens": tokens,
            "base_loss": base_loss,
            "adapter_loss": adapter_loss,
        },
        "generations": gens,
        # Better than the base on data it never trained on, and it answers at all.
        "passed": bool(
            base_loss is not None
            and adapter_loss is not None
            and adapter_loss < base_loss
            and all(g["adapter"] for g in gens)
        ),
    }
    card["validation"] = result
    write_json(adapter / CARD, card)
    return result


def lora_rank_flag(rank: int) -> int:
    for r in _RANKS:
        if r >= rank:
            return r
    raise ValidationError(f"LoRA rank {rank} is above what vLLM serves ({_RANKS[-1]})")


def validate_with_own_engine(
    adapter: Path,
    log_path: Path | None = None,
    gpu_memory_utilization: float = 0.05,
    **kw: Any,
) -> dict[str, Any]:
    """Start a vLLM engine for the card's base with runtime LoRA, validate, stop it."""
    from bastion.local.launcher import EngineSpec, VllmProcess, free_port

    card = load_card(adapter)
    verify_files(adapter, card)  # fail before paying for an engine start
    rank = lora_rank_flag(int(card["hyperparameters"]["rank"]))
    spec = EngineSpec(
        Path(card["base"]["path"]),
        "base",
        free_port(),
        # On CPU the share of RAM for the KV cache; on a GPU raise it to fit the base model.
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=4096,
        extra_args=("--enable-lora", "--max-lora-rank", str(rank)),
    )
    proc = VllmProcess(spec, log_path=log_path, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        proc.start()
        proc.wait_ready(timeout=600)
        return run_validation(adapter, proc.url, base_name="base", **kw)
    finally:
        proc.stop()
