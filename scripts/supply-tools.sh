#!/usr/bin/env bash
# Installs the supply-chain tools (pip-compile, pip-audit, cyclonedx-py) into their own venv from
# the hash-pinned requirements/tools.txt, and prints the venv's path. Idempotent: the venv is
# reused while tools.txt is unchanged. They live apart from .venv so that they never move a pin of
# the gateway's (pip-audit and cyclonedx-bom bring ~50 packages of their own).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BASTION_SUPPLY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bastion/supply-venv}"
PY="${BASTION_SUPPLY_PYTHON:-python3.11}"
want="tools:$(sha256sum requirements/tools.txt | cut -c1-64)"
if [ "$(cat "$VENV/.bastion-supply-ok" 2>/dev/null)" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || { mkdir -p "$(dirname "$VENV")" && "$PY" -m venv "$VENV"; }
  # --no-deps: the lock is complete, so nothing that is not pinned with a hash comes in.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --require-hashes \
    -r requirements/tools.txt 2> >(grep -v "^WARNING: Location" >&2) >&2
  "$VENV/bin/python" -c "import piptools, pip_audit, cyclonedx_py" >&2
  echo "$want" > "$VENV/.bastion-supply-ok"
fi
echo "$VENV"
