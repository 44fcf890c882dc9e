#!/usr/bin/env bash
# Installs the real coding assistants the tests drive, each pinned by its lock file, into the
# cache: Claude Code (tests/clients/) into ~/.cache/bastion/clients, OpenAI's Codex CLI
# (tests/clients/codex/) into ~/.cache/bastion/clients-codex. Idempotent: npm runs only when a
# lock changed. Fails loudly when the npm registry cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/bastion"

install_pinned() {  # install_pinned <folder with package.json and its lock> <destination>
  local src="$1" dest="$2"
  mkdir -p "$dest"
  if [ ! -d "$dest/node_modules" ] || ! cmp -s "$src/package-lock.json" "$dest/package-lock.json"; then
    cp "$src/package.json" "$src/package-lock.json" "$dest/"
    (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error) \
      || { echo "installing $src from npm failed: is the npm registry reachable?" >&2; exit 1; }
  fi
}

install_pinned tests/clients "${BASTION_CLIENTS_DIR:-$cache/clients}"
install_pinned tests/clients/codex "$cache/clients-codex"
