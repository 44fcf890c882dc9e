"""Tiers without engines: the config checks of fallbacks and routers, router rules, and which
failures may move a request to the next alias."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.config import ConfigError, parse_settings
from bastion.core.errors import (
    EngineConnectError,
    EngineOverloaded,
    FirstByteTimeout,
    QueueTimeout,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bastion.core.request import ParsedRequest
from bastion.routing.settings import RouterSettings
from bastion.routing.tiers import Facts, decide, fallback_reason

DEP = {"url": "http://127.0.0.1:8001", "served_name": "m"}


def _models(**extra: dict[str, Any]) -> dict[str, Any]:
    models: dict[str, Any] = {"flash": {"deployments": [DEP]}, "pro": {"deployments": [DEP]}}
    for alias, cfg in extra.items():
        models.setdefault(alias, {"deployments": [DEP]}).update(cfg)
    return models


def _err(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, "bastion.yaml")
    return str(info.value)


def test_fallbacks_are_checked_at_load() -> None:
    ok = parse_settings(
        {"models": _models(flash={"fallbacks": ["pro"]}, pro={"fallbacks": ["flash"]})}
    )
    assert ok.models["flash"].fallbacks == ["pro"]  # flash -> pro, and pro -> flash degraded
    assert "models.flash.fallbacks: unknown model 'nope'" in _err(
        {"models": _models(flash={"fallbacks": ["nope"]})}
    )
    assert "models.flash.fallbacks: 'flash' falls back to itself (a cycle)" in _err(
        {"models": _models(flash={"fallbacks": ["flash"]})}
    )
    assert "models.flash.fallbacks: an alias is listed twice" in _err(
        {"models": _models(flash={"fallbacks": ["pro", "pro"]})}
    )
    msg = _err({"models": _models(flash={"fallbacks": ["emb"]}, emb={"kind": "embedding"})})
    assert "models.flash.fallbacks: 'emb' is a embedding model, 'flash' a chat one" in msg


def test_routers_are_checked_at_load() -> None:
    rule = {"name": "tools", "tools": True, "target": "pro"}
    s = parse_settings(
        {"models": _models(), "routers": {"auto": {"rules": [rule], "default": "flash"}}}
    )
    assert s.routers["auto"].targets == ["pro", "flash"]
    assert "routers.auto: unknown model 'gone' (routers target models)" in _err(
        {"models": _models(), "routers": {"auto": {"rules": [rule], "default": "gone"}}}
    )
    assert "routers.flash: a model alias has this name" in _err(
        {"models": _models(), "routers": {"flash": {"default": "pro"}}}
    )
    assert "routers.auto.rules[0]: no condition" in _err(
        {
            "models": _models(),
            "routers": {"auto": {"rules": [{"name": "x", "target": "pro"}], "default": "flash"}},
        }
    )
    msg = _err(
        {
            "models": _models(emb={"kind": "embedding"}),
            "routers": {"auto": {"default": "emb", "rules": [rule]}},
        }
    )
    assert "routers.auto: targets of different kinds (chat, embedding)" in msg


class _Wire:
    name = "chat"


def _req(**body: Any) -> ParsedRequest:
    return ParsedRequest(_Wire(), {"model": "auto", **body}, "auto", False)  # type: ignore[arg-type]


ROUTER = RouterSettings(
    rules=[
        {"name": "long", "prompt_tokens_over": 100, "target": "pro"},
        {"name": "agent", "tools": True, "target": "pro"},
        {"name": "think", "reasoning_effort": ["high"], "target": "pro"},
        {"name": "asked", "header": {"name": "X-Tier", "equals": "pro"}, "target": "pro"},
        {"name": "risk", "teams": ["risk"], "target": "pro"},
        {"name": "both", "tools": False, "teams": ["ops"], "target": "flash"},
    ],
    default="flash",
)
ALL = {"pro": True, "flash": True}


def _pick(
    req: ParsedRequest,
    headers: dict[str, str] | None = None,
    team: str = "t",
    prompt: int = 10,
    may: dict[str, bool] = ALL,
) -> tuple[str, str] | None:
    d = decide(ROUTER, req, Facts(headers or {}, team, prompt), may)
    return None if d is None else (d.rule, d.target)


def test_rules_first_match_wins() -> None:
    assert _pick(_req()) == ("default", "flash")
    assert _pick(_req(), prompt=101) == ("long", "pro")
    assert _pick(_req(), prompt=100) == ("default", "flash")  # "over" is strict
    assert _pick(_req(tools=[{"type": "function"}])) == ("agent", "pro")
    assert _pick(_req(tools=[])) == ("default", "flash")  # an empty list declares no tools
    assert _pick(_req(reasoning_effort="high")) == ("think", "pro")
    assert _pick(_req(reasoning={"effort": "high"})) == ("think", "pro")  # Responses API
    assert _pick(_req(reasoning_effort="low")) == ("default", "flash")
    assert _pick(_req(), headers={"x-tier": "pro"}) == ("asked", "pro")
    assert _pick(_req(), headers={"x-tier": "Pro"}) == ("default", "flash")  # values exact
    assert _pick(_req(), team="risk") == ("risk", "pro")
    assert _pick(_req(), team="ops") == ("both", "flash")  # every condition of a rule holds
    assert _pick(_req(tools=[{"type": "function"}]), prompt=500) == ("long", "pro")  # in order


def test_a_router_never_widens_a_key() -> None:
    no_pro = {"pro": False, "flash": True}
    assert _pick(_req(tools=[{"type": "function"}]), may=no_pro) == ("default", "flash")
    assert _pick(_req(), may={"pro": True, "flash": False}) is None


def test_what_moves_a_request_to_the_next_alias() -> None:
    assert fallback_reason(EngineConnectError("refused")) == "unavailable"
    assert fallback_reason(UpstreamUnavailable("503")) == "unavailable"
    assert fallback_reason(EngineOverloaded("429")) == "overloaded"
    assert fallback_reason(FirstByteTimeout("slow")) == "first_byte_timeout"
    assert fallback_reason(UpstreamTimeout("no headers")) == "first_byte_timeout"
    assert fallback_reason(QueueTimeout("queue")) == "queue_timeout"
    # Never: the client's own fault, or an engine error the request may have caused.
    assert fallback_reason(UpstreamRejected("context too long")) is None
    assert fallback_reason(UpstreamError("engine error 500")) is None
