"""Who may call which model: the request path's authorization stage.

A key calls a model if its role calls models and its model list (none: every model of its
team's config) names it. An adapter alias is checked as called; its base alias, which serves
it, need not be open to the key. A staging adapter (validated, not approved: under evaluation)
is open only to keys that name its alias.
"""

from __future__ import annotations

from bastion.core.errors import InvalidRequest, NotFound, PermissionDenied, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.gateway.wire import WireAdapter
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS
from bastion.registry.adapters import AdapterDeployment
from bastion.routing.balancer import ModelRoute


def may_call(principal: Principal, name: str) -> None:
    if principal.role not in CALLERS:
        raise PermissionDenied(
            f"The {principal.role} role cannot call models.", code="role_not_allowed"
        )
    if not principal.may_use(name):
        raise PermissionDenied(f"This key may not use the model '{name}'.", param="model")


def may_call_adapter(principal: Principal, adapter: AdapterDeployment) -> None:
    may_call(principal, adapter.alias)
    if adapter.stage == "staging" and adapter.alias not in (principal.models or ()):
        raise PermissionDenied(
            f"'{adapter.alias}' serves {adapter.adapter}, which is not approved yet (a "
            "staging deployment): only keys that name it may call it.",
            param="model",
        )


def authorize(
    routes: dict[str, ModelRoute], principal: Principal, req: ParsedRequest, wire: WireAdapter
) -> ModelRoute:
    if principal.role not in CALLERS:
        raise PermissionDenied(
            f"The {principal.role} role cannot call models.", code="role_not_allowed"
        )
    route = routes.get(req.model)
    if route is None or not (req.adapter or principal.may_use(req.model)):
        if route is None:
            raise NotFound(f"The model '{req.model}' does not exist.", param="model")
        raise PermissionDenied(f"This key may not use the model '{req.model}'.", param="model")
    if route.settings.kind not in wire.serves:
        raise InvalidRequest(
            f"The model '{req.model}' is a {route.settings.kind} model and "
            f"does not serve {wire.path}.",
            param="model",
            code="wrong_endpoint",
        )
    return route


def adapter_gone(exc: UpstreamError, adapter: str) -> bool:
    """The engine no longer serves the adapter it was believed to have (it restarted, or was
    unloaded behind Bastion's back): vLLM answers 404 "The model `NAME@VERSION` does not
    exist"."""
    return adapter in exc.message and "does not exist" in exc.message
