"""Request caps, checked before anything reaches an engine: 400 naming the cap; and the
model's default completion cap for requests that set none."""

from __future__ import annotations

from bastion.config import Settings
from bastion.core.errors import InvalidRequest
from bastion.core.request import ParsedRequest


def check_caps(settings: Settings, req: ParsedRequest) -> None:
    limits = settings.limits
    body = req.body
    if req.endpoint == "chat" and len(body["messages"]) > limits.max_messages:
        raise InvalidRequest(
            f"Too many messages: {len(body['messages'])}; the limit is {limits.max_messages} "
            "(limits.max_messages).",
            param="messages",
            code="too_many_messages",
        )
    n = body.get("n") or 1
    if n > limits.max_n:
        raise InvalidRequest(
            f"'n' is {n}; the limit is {limits.max_n} (limits.max_n).",
            param="n",
            code="n_too_large",
        )
    model = settings.models[req.model]
    if (
        req.endpoint != "embeddings"
        and body.get("max_tokens") is None
        and body.get("max_completion_tokens") is None
    ):
        # The model's default cap, sent to the engine too: what was reserved is what may be
        # generated, so budgets and token limits hold even when clients set no limit.
        body["max_tokens"] = min(model.default_max_tokens, model.max_tokens or 1 << 31)
    ceiling = model.max_tokens
    if ceiling is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and value > ceiling:
                raise InvalidRequest(
                    f"'{name}' is {value}; the limit for model '{req.model}' is {ceiling} "
                    f"(models.{req.model}.max_tokens).",
                    param=name,
                    code="max_tokens_too_large",
                )
