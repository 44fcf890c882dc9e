"""Settings of `models:`: the aliases clients call, each with the engine replicas behind it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bastion.core.settings import NAME, LimitSettings, Strict, section
from bastion.engines.settings import DeploymentSettings


class ModelSettings(Strict):
    deployments: list[DeploymentSettings] = Field(
        min_length=1, description="Engine replicas serving this alias."
    )
    kind: Literal["chat", "completion", "embedding"] = Field(
        "chat", description="What the model does; embeddings models only serve /v1/embeddings."
    )
    owned_by: str = Field("bastion", description="Shown in /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, description="Ceiling on a request's `max_tokens` (400 above it)."
    )
    tokenizer: str | None = Field(
        None,
        description="The model's tokenizer (its directory or tokenizer.json), for exact "
        "prompt-token reservations; without it one token per UTF-8 byte is reserved "
        "(an upper bound). Needs the `tokenizers` extra.",
    )
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="`max_tokens` for requests that set none: sent to the engine and reserved "
        "against token limits and budgets. Keep it within the engine's context length.",
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Limits for the model as a whole."
    )


section(
    "models",
    dict[Annotated[str, Field(pattern=NAME)], ModelSettings],
    "Model aliases clients call, each → deployments.",
    default_factory=dict,
)
