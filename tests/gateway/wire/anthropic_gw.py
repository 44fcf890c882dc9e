"""A gateway for the Anthropic Messages tests: the tiny vLLM engine behind three aliases — one
that serves Messages natively, one declared to serve only OpenAI's APIs (so Bastion translates),
and one with a low output ceiling (Claude Code's `max_tokens: 32000` is clamped to it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.local.launcher import VllmProcess
from tests.audit_api import entries_of
from tests.conftest import TINY, Gateway, base_config

NATIVE, TRANSLATED, CAPPED = "tiny", "tiny-translated", "tiny-capped"
CAP = 24


def models(chat: VllmProcess) -> dict[str, Any]:
    dep = {"url": chat.url, "served_name": TINY}
    return {
        NATIVE: {"deployments": [dep]},
        TRANSLATED: {"deployments": [{**dep, "apis": ["chat", "completions", "embeddings"]}]},
        CAPPED: {"max_tokens": CAP, "deployments": [dep]},
    }


@pytest.fixture(scope="module")
def msg_gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    db: Path = tmp_path_factory.mktemp("msg-db") / "bastion.db"
    cfg = base_config(
        f"sqlite:///{db}",
        models(chat_engine),
        prices={NATIVE: {"prompt": 1.0, "completion": 2.0}},
    )
    cfg["teams"]["slow"] = {"cost_center": "cc-1", "limits": {"rpm": 1}}
    gw = make_gateway(cfg)
    gw.wait_ready()
    return gw


def db_url(gw: Gateway) -> str:
    return str(gw.config["database"]["url"])


def audit_of(gw: Gateway, auditor: str, rid: str, want: int = 2) -> list[dict[str, Any]]:
    """The request's audit entries (contents unsealed), as an auditor reads them."""
    return entries_of(gw.url, auditor, rid, want)
