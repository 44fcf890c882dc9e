#!/usr/bin/env bash
# Installs Bastion into .venv and the vLLM CPU engine into its own venv. Idempotent.
# Usage: scripts/install.sh [--dev]   (BASTION_LOCK=requirements/prod.txt: the production extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${BASTION_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$c"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "Python >= 3.11 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=""
if [ "${1:-}" = "--dev" ]; then
  extra="[dev]"
  # python-ldap builds against libldap; the LDAP tests run a real OpenLDAP slapd; the OIDC
  # tests run a real oidc-provider under Node (installed from npm into ~/.cache on first use).
  need=()
  for pkg in libldap2-dev libsasl2-dev slapd; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  # The console tests drive Debian's Chromium with Playwright (its own browser download
  # cannot work offline); playwright itself comes with the dev extra.
  dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
# Everything comes from a hash-pinned lock (requirements/, made by scripts/lock): pip refuses a
# file whose sha256 is not in the lock, and --no-deps means nothing unpinned is ever pulled in.
# setuptools goes first, alone, so that what builds from source (python-ldap, Bastion itself)
# builds with the locked setuptools instead of one fetched into an isolated build environment.
lock="${BASTION_LOCK:-requirements/$([ -n "$extra" ] && echo dev || echo gateway).txt}"
pipi() {
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
build="$(awk '/^setuptools==/ {p = 1} p {print; if ($0 !~ /\\$/) exit}' "$lock")"
[ -n "$build" ] || { echo "$lock pins no setuptools: regenerate it with scripts/lock" >&2; exit 1; }
pipi -r <(echo "$build")
pipi --no-build-isolation -r "$lock"
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
  2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import bastion"
bash scripts/install-engine.sh 2>&1 | grep -v "^WARNING: Location"
if [ -n "$extra" ]; then
  # The coding assistants the tests run for real (Claude Code, Codex CLI), from npm.
  bash scripts/install-clients.sh
fi
