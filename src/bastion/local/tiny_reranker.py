"""Generate Bastion's tiny, deterministic cross-encoder (a reranker) for tests.

Run it with the *engine* virtualenv's python (it needs torch and transformers)::

    ~/.cache/bastion/vllm-venv/bin/python src/bastion/local/tiny_reranker.py TOKENIZER_DIR OUT

A BERT sequence-classification model with one label (the relevance score), two layers of
two 64-wide heads (the CPU attention backend needs head size ≥ 64), random weights after
``torch.manual_seed(0)``. The tokenizer is reused, not trained: the WordPiece tokenizer of
the all-MiniLM-L6-v2 embedding model the engine venv already carries (TOKENIZER_DIR), so a
query and a document are encoded as the pair ``[CLS] q [SEP] d [SEP]`` a cross-encoder reads.
Nothing is downloaded. Its scores are random numbers: it exists so that `/v1/rerank` and
`/v1/score` are exercised against a real engine, not to rank well.

The output directory appears atomically (a temporary sibling renamed into place).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

#: Bump whenever the generated files change.
GENERATOR_VERSION = 1
STAMP_FILE = "bastion-model.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def generate(tokenizer_dir: Path, out: Path) -> Path:
    if (out / STAMP_FILE).is_file():
        return out
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / STAMP_FILE).write_text(json.dumps({"generator_version": GENERATOR_VERSION}))
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_reranker() -> Path:
    """The generated cross-encoder's directory under the model cache, generated once (with
    the engine venv's python: the gateway never imports torch)."""
    from bastion.local.launcher import (
        _engine_env,
        embedding_model_dir,
        engine_python,
        model_cache_dir,
    )

    out = model_cache_dir() / f"tiny-rerank-v{GENERATOR_VERSION}"
    if not (out / STAMP_FILE).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = embedding_model_dir()
        cmd = [str(engine_python()), __file__, str(tokenizer), str(out)]
        subprocess.run(cmd, env=_engine_env(), check=True, capture_output=True, timeout=600)
    return out


if __name__ == "__main__":
    generate(Path(sys.argv[1]), Path(sys.argv[2]))
