"""OpenAI's Codex CLI, unmodified, against Bastion in front of the real vLLM engine.

Codex is configured as a bank would configure it (../../docs/coding-assistants.md): a custom
provider with `wire_api = "responses"` whose bearer comes from an environment variable. It runs
non-interactively (`codex exec`); the test asserts that it succeeds ("tokens used") and that
each of its requests was audited and metered on the Responses endpoint.

The CLI is pinned in tests/clients/codex/ and installed from npm into the cache by
`scripts/install.sh --dev` (or here on first use). If npm cannot be reached, this fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from bastion.store.schema import audit_entries
from tests.conftest import Gateway, usage_rows

pytestmark = pytest.mark.engine
PINNED = Path(__file__).resolve().parent / "codex"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bastion/clients-codex"


def codex_binary() -> Path:
    """The pinned Codex CLI, installed into the cache unless it is there already."""
    binary = CACHE / "node_modules/.bin/codex"
    lock = PINNED / "package-lock.json"
    cached_lock = CACHE / "package-lock.json"
    if binary.exists() and cached_lock.exists() and cached_lock.read_bytes() == lock.read_bytes():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(PINNED / name, CACHE / name)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=CACHE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0 or not binary.exists():
        raise RuntimeError(
            "installing @openai/codex from npm failed (is the npm registry reachable?):\n"
            + done.stderr[-3000:]
        )
    return binary


def codex_home(directory: Path, base_url: str) -> Path:
    home = directory / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "tiny"\n'
        'model_provider = "bank"\n'
        "\n"
        "[model_providers.bank]\n"
        'name = "Bank gateway"\n'
        f'base_url = "{base_url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "BANK_KEY"\n'
    )
    return home


def _audited(db_url: str, request_ids: set[str]) -> list[dict[str, Any]]:
    engine = sa.create_engine(db_url)
    deadline = time.monotonic() + 20
    try:
        while True:
            q = sa.select(audit_entries.c.doc).where(audit_entries.c.request_id.in_(request_ids))
            with engine.connect() as conn:
                docs = [orjson.loads(d) for (d,) in conn.execute(q)]
            if len(docs) >= 2 * len(request_ids) or time.monotonic() > deadline:
                return docs
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_codex_exec_through_bastion(gateway: Gateway, tmp_path: Path) -> None:
    codex = codex_binary()
    key = gateway.create_key("alpha", "--user", "codex-user")
    home = codex_home(tmp_path, gateway.url)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CODEX_HOME": str(home),
        "BANK_KEY": key,
        "NO_COLOR": "1",
    }
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "Say hello"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "tokens used" in out, out[-4000:]

    rows = usage_rows(gateway.config["database"]["url"], user="codex-user")
    assert rows, "Codex's requests were not metered"
    assert all(r.endpoint == "responses" and r.model == "tiny" for r in rows)
    assert all(r.status == 200 and r.stream for r in rows), [(r.status, r.error_code) for r in rows]
    assert sum(r.prompt_tokens for r in rows) > 0 and sum(r.completion_tokens for r in rows) > 0
    ids = {r.request_id for r in rows}
    docs = _audited(gateway.config["database"]["url"], ids)
    kinds = sorted((d["request_id"], d["kind"]) for d in docs)
    assert kinds == sorted((i, k) for i in ids for k in ("request", "completion")), kinds
    assert all(d["endpoint"] == "responses" for d in docs)
