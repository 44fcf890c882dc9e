"""Claude Code itself (npm `@anthropic-ai/claude-code`, unmodified, pinned in tests/clients)
through Bastion in front of the real tiny vLLM engine: every request it makes succeeds and is
metered and audited. The tiny model answers gibberish, so Claude Code may end with "response
exceeded the N output token maximum": that is the protocol working, not a failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Gateway, usage_rows
from tests.gateway.wire.anthropic_gw import (
    CAP,
    CAPPED,
    NATIVE,
    TRANSLATED,
    audit_of,
    db_url,
    msg_gateway,
)

pytestmark = pytest.mark.engine
__all__ = ["msg_gateway"]
CLIENTS = Path(
    os.environ.get("BASTION_CLIENTS_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bastion/clients"
)


@pytest.fixture(scope="module")
def claude() -> Path:
    """The pinned Claude Code, installed from npm if missing (no skipping: it must install)."""
    subprocess.run(["bash", str(ROOT / "scripts/install-clients.sh")], check=True)
    binary = CLIENTS / "node_modules/.bin/claude"
    assert binary.exists(), f"{binary} missing after scripts/install-clients.sh"
    return binary


@pytest.mark.parametrize(
    ("model", "max_output"),
    [(NATIVE, "64"), (TRANSLATED, "64"), (CAPPED, None)],
    ids=["native", "translated", "default-32000-clamped"],
)
def test_claude_code_print_mode(
    claude: Path, msg_gateway: Gateway, tmp_path: Path, model: str, max_output: str | None
) -> None:
    key = msg_gateway.create_key("alpha", "--user", f"claude-{model}")
    auditor = msg_gateway.create_auditor_key("alpha", "carol")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": msg_gateway.url,
        "ANTHROPIC_API_KEY": key,
        # Background calls (titles, summaries) go to the same alias, not to a Claude model.
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    if max_output is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = max_output
    run = subprocess.run(
        [str(claude), "-p", "Say hello", "--model", model, "--max-turns", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = run.stdout + run.stderr
    (tmp_path / "claude.out").write_text(said)
    # The tiny model's gibberish runs to the ceiling: Claude Code says so, and that is success.
    errors = [
        ln for ln in said.splitlines() if "API Error" in ln and "output token maximum" not in ln
    ]
    assert not errors and "may not exist" not in said, said
    rows = usage_rows(db_url(msg_gateway), timeout=10, user=f"claude-{model}")
    assert rows, f"Claude Code made no request through Bastion: {said}"
    for row in rows:
        assert (row.status, row.outcome) == (200, "ok"), (row.request_id, row.error_code, said)
        assert row.endpoint in ("messages", "count_tokens") and row.model == model
        assert row.prompt_tokens > 0 and not row.tokens_estimated
        req, done = audit_of(msg_gateway, auditor, row.request_id)
        assert req["kind"] == "request" and done["kind"] == "completion"
        assert done["status"] == 200 and done["outcome"] == "ok"
    gen = [r for r in rows if r.endpoint == "messages"]
    assert gen and all(r.completion_tokens > 0 for r in gen)
    if model == CAPPED:  # Claude Code's default ceiling, clamped to the model's
        assert all(r.completion_tokens <= CAP for r in gen)
