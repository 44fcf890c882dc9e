"""Writes a small random-weight Llama with a shape unlike the tiny model's, for checking the
capacity planner against vLLM: GQA (4 heads, 2 KV heads of 32), sliding-window layers
alternating with full-attention ones (layer_types, window 128), stored in fp32 (vLLM serves it
in bf16). Run with the engine venv's Python: `python make_hybrid_model.py TINY_DIR OUT_DIR`.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((src / "config.json").read_text())
cfg.update(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    hidden_size=128,
    layer_types=["sliding_attention", "full_attention"] * 2,
    sliding_window=128,
    torch_dtype="float32",
    dtype="float32",
)
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32).save_pretrained(dst)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / name, dst / name)
