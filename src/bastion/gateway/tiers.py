"""The request path's part of tiers (routing/tiers.py): a router's choice of alias, and the
fallback chain — queue, audit, route and relay on the alias called, or on the next of its
`fallbacks` while it cannot take the request and nothing has reached the client.

How limits, prices and permissions apply when another alias serves (docs/routing.md): the
caller's levels (key, user, team, cost center) and the called alias's model levels admitted the
request once; a fallback's own model levels (model, team x model) must admit it too, or it is
skipped, as is one the caller's key may not use or whose caps the request exceeds. The price of
the alias that served is what is charged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bastion.core.errors import BastionError, PermissionDenied, QueueTimeout, RateLimited
from bastion.core.request import ParsedRequest
from bastion.gateway.relay import Receive, SSERelay
from bastion.gateway.wire import WireAdapter
from bastion.identity.principal import Principal
from bastion.routing.balancer import ModelRoute
from bastion.routing.settings import RouterSettings
from bastion.routing.tiers import Decision, Facts, NotServed, decide, needs_prompt_count

if TYPE_CHECKING:
    from starlette.responses import Response

    from bastion.gateway.call import Call
    from bastion.gateway.pipeline import Gateway

log = logging.getLogger("bastion.gateway")


async def pick(
    gw: Gateway,
    router: RouterSettings,
    principal: Principal,
    req: ParsedRequest,
    headers: Mapping[str, str],
) -> Decision:
    """The alias a router sends this request to (logged and counted); PermissionDenied where
    no rule the caller may use matches and the default is not one it may use."""
    name = req.model
    prompt = 0
    if needs_prompt_count(router):  # the default target's tokenizer, else the upper bound
        prompt = await gw.admission.prompts.count(req, router.default)
    facts = Facts({k.lower(): v for k, v in headers.items()}, principal.team, prompt)
    may_use = {t: principal.may_use(t) for t in router.targets}
    decision = decide(router, req, facts, may_use)
    if decision is None:
        raise PermissionDenied(
            f"No model the router '{name}' chooses from is open to this key.", param="model"
        )
    gw.metrics.router_decisions.labels(name, decision.rule, decision.target).inc()
    log.info("router %s: rule %s -> %s", name, decision.rule, decision.target)
    return decision


def unfit(principal: Principal, req: ParsedRequest, wire: WireAdapter, target: ModelRoute) -> str:
    """Why a fallback may not serve this request ("" if it may): checked as the called alias
    was (fail closed: a key never reaches a model it may not use through a fallback)."""
    model = target.settings
    if not principal.may_use(target.alias):
        return "the key may not use it"
    if model.kind not in wire.serves:
        return f"a {model.kind} model does not serve {wire.path}"
    if refused := req.fields & model.engine_fields.refused:
        return f"it refuses the field '{sorted(refused)[0]}'"
    ceiling = model.max_tokens
    if ceiling is not None and any(value > ceiling for _name, value in req.output_fields):
        return f"the request asks for more than its max_tokens ({ceiling})"
    return ""


async def serve(
    gw: Gateway,
    call: Call,
    principal: Principal,
    route: ModelRoute,
    req: ParsedRequest,
    wire: WireAdapter,
    receive: Receive,
) -> Response | SSERelay:
    # An adapter is loaded on its base's replicas only: another alias cannot serve it.
    fallbacks = () if req.adapter else route.settings.fallbacks
    chain = [route, *(gw.routes[a] for a in fallbacks)]
    rid = call.rec.request_id
    failure: BastionError | None = None
    moved: tuple[str, str] | None = None  # (from, reason) of the last move
    for target in chain:
        if target is not route:
            if why := unfit(principal, req, wire, target):
                log.info("%s: fallback %s skipped: %s", rid, target.alias, why)
                continue
            try:
                await _admit_serving(gw, call, principal, req, target)
            except (RateLimited, PermissionDenied) as exc:
                log.info("%s: fallback %s skipped: %s", rid, target.alias, exc.message)
                continue
        if moved is not None:
            gw.metrics.fallbacks.labels(moved[0], target.alias, moved[1]).inc()
            call.routing_headers["x-bastion-fallback-from"] = f"{moved[0]}; reason={moved[1]}"
            log.warning("%s: %s -> %s (%s)", rid, moved[0], target.alias, moved[1])
        try:
            if (queue := gw.queues.get(target.alias)) is not None:
                await queue.acquire(principal.team, gw._weight(principal.team))
                call.queue = queue
            await gw.request_entry(call, req)
            return await gw._relay(call, target, req, wire, receive)
        except QueueTimeout as exc:
            failure, moved = exc, (target.alias, "queue_timeout")
        except NotServed as exc:
            failure, moved = exc.error, (target.alias, exc.reason)
        if call.queue is not None:
            call.queue.release()
            call.queue = None
    assert failure is not None  # the called alias itself is never skipped
    raise failure


async def _admit_serving(
    gw: Gateway, call: Call, principal: Principal, req: ParsedRequest, target: ModelRoute
) -> None:
    prompt = call.ticket.prompt_tokens if call.ticket is not None else 0
    ticket = await gw.admission.admit_serving(
        principal, req, target.alias, call.rec.request_id, prompt
    )
    if ticket is not None:
        call.serving_tickets.append(ticket)
