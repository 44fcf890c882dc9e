#!/usr/bin/env bash
# Installs the real coding assistants the tests drive (tests/clients/package.json, pinned by its
# lock file) into ~/.cache/bastion/clients. Idempotent: npm runs only when the lock changed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${BASTION_CLIENTS_DIR:-$HOME/.cache/bastion/clients}"
mkdir -p "$DEST"
if [ ! -d "$DEST/node_modules" ] || ! cmp -s tests/clients/package-lock.json "$DEST/package-lock.json"; then
  cp tests/clients/package.json tests/clients/package-lock.json "$DEST/"
  (cd "$DEST" && npm ci --no-audit --no-fund --loglevel=error)
fi
