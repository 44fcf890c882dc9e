"""Request caps, checked before anything reaches an engine: 400 naming the cap; and the
model's default output ceiling for requests that set none."""

from __future__ import annotations

from bastion.config import Settings
from bastion.core.errors import InvalidRequest
from bastion.core.request import ParsedRequest


def check_caps(settings: Settings, req: ParsedRequest) -> None:
    limits = settings.limits
    if req.messages is not None and req.messages > limits.max_messages:
        raise InvalidRequest(
            f"Too many messages: {req.messages}; the limit is {limits.max_messages} "
            "(limits.max_messages).",
            param="messages",
            code="too_many_messages",
        )
    if req.choices > limits.max_n:
        raise InvalidRequest(
            f"'{req.choices_param}' is {req.choices}; the limit is {limits.max_n} (limits.max_n).",
            param=req.choices_param,
            code="n_too_large",
        )
    model = settings.models[req.model]
    if refused := req.fields & model.engine_fields.refused:
        name = sorted(refused)[0]
        raise InvalidRequest(
            f"The field '{name}' steers the engine and is not allowed for model "
            f"'{req.model}' (models.{req.model}.engine_fields).",
            param=name,
            code="field_not_allowed",
        )
    if not req.generates:
        return
    if req.max_output is None:
        # The model's default cap, sent to the engine too: what was reserved is what may be
        # generated, so budgets and token limits hold even when clients set no limit.
        req.wire.set_output_ceiling(req, min(model.default_max_tokens, model.max_tokens or 1 << 31))
    ceiling = model.max_tokens
    if ceiling is not None and getattr(req.wire, "clamps_output", False):
        _clamp(req, ceiling)
    if ceiling is not None:
        for name, value in req.output_fields:
            if value > ceiling:
                raise InvalidRequest(
                    f"'{name}' is {value}; the limit for model '{req.model}' is {ceiling} "
                    f"(models.{req.model}.max_tokens).",
                    param=name,
                    code="max_tokens_too_large",
                )


def _clamp(req: ParsedRequest, ceiling: int) -> None:
    """Lowers an output ceiling above the model's to it, saying so in a response header."""
    asked = max((value for _name, value in req.output_fields), default=0)
    if asked <= ceiling:
        return
    req.wire.set_output_ceiling(req, ceiling)
    req.output_fields = [(name, min(value, ceiling)) for name, value in req.output_fields]
    req.response_headers["x-bastion-max-tokens-clamped"] = f"{asked}->{ceiling}"
