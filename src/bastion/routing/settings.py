"""Settings of `models:`: the aliases clients call, each with the engine replicas behind it."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field

from bastion.core.settings import NAME, LimitSettings, Strict, section
from bastion.engines.settings import DeploymentSettings

#: Body fields that steer the engine itself rather than the answer: refused unless a model
#: allows them. `kv_transfer_params` names hosts the engine connects to under disaggregated
#: serving (an SSRF channel), `priority` jumps the engine's queue, `chat_template` and
#: `chat_template_kwargs` replace the prompt format the model was validated with,
#: `vllm_xargs` passes arbitrary engine arguments, `request_id` can collide with another
#: request's engine-side id.
ENGINE_CONTROL_FIELDS = (
    "kv_transfer_params",
    "priority",
    "chat_template",
    "chat_template_kwargs",
    "vllm_xargs",
    "request_id",
)


class EngineFieldPolicy(Strict):
    """Which body fields reach the engine. Everything else passes through untouched."""

    deny: list[str] = Field(
        default_factory=lambda: list(ENGINE_CONTROL_FIELDS),
        description="Top-level body fields refused with 400 `field_not_allowed` (default: the "
        "engine-control fields kv_transfer_params, priority, chat_template, "
        "chat_template_kwargs, vllm_xargs, request_id).",
    )
    allow: list[str] = Field(
        default_factory=list,
        description="Fields of `deny` this model accepts anyway, for operators who use them "
        "deliberately (e.g. `priority` with the engine's priority scheduling).",
    )

    @cached_property
    def refused(self) -> frozenset[str]:
        """Computed once: every generating request is checked against it."""
        return frozenset(self.deny) - frozenset(self.allow)


#: Fill-in-the-middle presets by model family (their tokens: docs/gateway.md, "Fill in the middle").
#: `engine`: the engine renders `suffix` itself (vLLM does for DeepSeek-V4): passed through.
FimPreset = Literal["qwen-coder", "deepseek-coder", "starcoder", "codestral", "engine"]


class FimTemplate(Strict):
    """A model's fill-in-the-middle prompt, for families without a preset."""

    prefix: str = Field(description="The token that opens the code before the cursor.")
    suffix: str = Field(description="The token that opens the code after the cursor.")
    middle: str = Field("", description="The token after which the model writes the middle.")
    order: Literal["psm", "spm"] = Field(
        "psm",
        description="psm: prefix token, prefix, suffix token, suffix, middle token; spm: suffix "
        "token, suffix, prefix token, prefix, middle token.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop sequences added to every FIM request's `stop` (after the client's, up "
        "to the four an engine accepts).",
    )


class PreciseSettings(Strict):
    """`routing.mode: precise`: the engines' own KV-cache events say which replica holds a
    prompt's blocks (docs/routing.md, "Precise mode")."""

    hash_seed: str | None = Field(
        None,
        description="The engines' PYTHONHASHSEED (block hashes are seeded with it); none: "
        "vLLM's default seed for sha256_cbor. Engines run with --prefix-caching-hash-algo "
        "sha256_cbor.",
    )
    max_blocks: int = Field(
        1_000_000,
        ge=1000,
        description="Block hashes remembered per model across its replicas (~100 bytes "
        "each); past it a replica's oldest entries are forgotten.",
    )
    min_blocks: int = Field(
        1,
        ge=1,
        description="Cached blocks a replica must hold of the prompt for the cache to "
        "decide; below it the request is routed as in affinity mode.",
    )


class RoutingSettings(Strict):
    """How a request picks one of the model's deployments (docs/routing.md)."""

    mode: Literal["affinity", "least-outstanding", "precise"] = Field(
        "affinity",
        description="affinity: requests sharing a session hint or a prompt prefix go to the "
        "replica likely to hold its KV cache, within the load bound; least-outstanding: the "
        "replica with the fewest requests in flight (per weight); precise: the replica whose "
        "KV-cache events show the longest cached prefix of the prompt, within the load bound "
        "(vLLM with kv_events and the model's tokenizer; affinity otherwise).",
    )
    precise: PreciseSettings = Field(
        default_factory=PreciseSettings, description="Settings of the precise mode."
    )
    load_factor: float = Field(
        1.25,
        ge=1.0,
        description="affinity: no replica takes a request that would put it above "
        "ceil(load_factor * mean in-flight) over the available replicas (the request counted); "
        "the request spills to the next replica on the ring instead.",
    )


class ModelSettings(Strict):
    deployments: list[DeploymentSettings] = Field(
        min_length=1, description="Engine replicas serving this alias."
    )
    kind: Literal["chat", "completion", "embedding", "rerank"] = Field(
        "chat",
        description="What the model does; embeddings models only serve /v1/embeddings (and "
        "/v1/score, /v1/rerank); rerank (cross-encoder) models serve /v1/rerank and /v1/score.",
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
    fim: FimPreset | FimTemplate | None = Field(
        None,
        description="The model's fill-in-the-middle template: a preset (qwen-coder, "
        "deepseek-coder, starcoder, codestral) or {prefix, suffix, middle, order, stop}. "
        "`/v1/completions` with `suffix` is rendered with it (vLLM refuses `suffix` for most "
        "models); `engine` passes `suffix` to an engine that renders it itself; without a "
        "value such a request answers 400.",
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Limits for the model as a whole."
    )
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="How requests pick a deployment."
    )
    engine_fields: EngineFieldPolicy = Field(
        default_factory=EngineFieldPolicy,
        description="Body fields that steer the engine: refused unless allowed here.",
    )


section(
    "models",
    dict[Annotated[str, Field(pattern=NAME)], ModelSettings],
    "Model aliases clients call, each → deployments.",
    default_factory=dict,
)
