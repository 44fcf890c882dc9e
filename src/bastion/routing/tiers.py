"""Tiers: fallback chains between aliases, and routers that pick an alias by declared rules.

A request moves from one alias to the next of its `fallbacks` only while nothing of the answer
has reached Bastion's client — the engine refused or dropped the connection on every
deployment, answered 429 or 503, sent no first byte in time, or Bastion's own queue for the
alias timed out. The pipeline (`gateway/pipeline.py`) runs the chain; what may trigger a move
is decided here, once, so that it is the same for every wire API.

A router (`routers.<name>`) is a model name clients call that is no model: its rules, in
order, pick the alias that serves the request (docs/routing.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bastion.core.errors import (
    BastionError,
    EngineConnectError,
    EngineOverloaded,
    QueueTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bastion.core.request import ParsedRequest
from bastion.routing.settings import RouterRule, RouterSettings


class NotServed(Exception):
    """The alias could not take the request and nothing was sent to the client: the next
    alias of its chain may. `error` is what the client gets if none is left."""

    def __init__(self, error: BastionError, reason: str):
        super().__init__(error.message)
        self.error = error
        self.reason = reason


def fallback_reason(exc: BaseException) -> str | None:
    """Why `exc`, raised before any byte of the answer was read, lets the request move on;
    None when it must not (a 4xx the next model would refuse too, an engine error the request
    may itself have caused)."""
    if isinstance(exc, QueueTimeout):
        return "queue_timeout"
    if isinstance(exc, EngineOverloaded):
        return "overloaded"
    if isinstance(exc, EngineConnectError | UpstreamUnavailable):  # refused, or 503
        return "unavailable"
    if isinstance(exc, UpstreamTimeout):  # no headers, or no first event, in time
        return "first_byte_timeout"
    return None


def not_served(exc: UpstreamError) -> NotServed | UpstreamError:
    """`exc` (an engine failure before the answer's first byte) as a fallback, where it is one."""
    reason = fallback_reason(exc)
    return exc if reason is None else NotServed(exc, reason)


@dataclass(frozen=True, slots=True)
class Decision:
    target: str
    rule: str  # a rule's name, or "default"


@dataclass(frozen=True, slots=True)
class Facts:
    """What rules look at, gathered once per request."""

    #: Request headers, keys lower-case.
    headers: Mapping[str, str]
    team: str
    prompt_tokens: int


def rule_matches(rule: RouterRule, req: ParsedRequest, facts: Facts) -> bool:
    """Every condition the rule sets holds (conditions it leaves unset do not count)."""
    body = req.body
    if rule.prompt_tokens_over is not None and facts.prompt_tokens <= rule.prompt_tokens_over:
        return False
    if rule.tools is not None and rule.tools != bool(body.get("tools")):
        return False
    if rule.reasoning_effort is not None and effort(body) not in rule.reasoning_effort:
        return False
    if rule.header is not None:
        value = facts.headers.get(rule.header.name.lower())
        if value != rule.header.equals:
            return False
    return rule.teams is None or facts.team in rule.teams


def effort(body: Mapping[str, object]) -> str | None:
    """`reasoning_effort` (chat completions), or `reasoning.effort` (Responses API)."""
    value = body.get("reasoning_effort")
    if value is None and isinstance(reasoning := body.get("reasoning"), dict):
        value = reasoning.get("effort")
    return value if isinstance(value, str) else None


def needs_prompt_count(router: RouterSettings) -> bool:
    return any(r.prompt_tokens_over is not None for r in router.rules)


def decide(
    router: RouterSettings,
    req: ParsedRequest,
    facts: Facts,
    may_use: Mapping[str, bool],
) -> Decision | None:
    """The first rule that matches and whose target the caller may use; else the default if
    the caller may use it; else None (refused: a router never widens a key's models)."""
    for rule in router.rules:
        if may_use[rule.target] and rule_matches(rule, req, facts):
            return Decision(rule.target, rule.name)
    return Decision(router.default, "default") if may_use[router.default] else None
