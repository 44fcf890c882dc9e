"""Settings of `models:`: the aliases clients call, each with the engine replicas behind it."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

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


class RetryBudgetSettings(Strict):
    """Retries (a request moved to another replica after a refused connection) allowed per
    model: `ratio` of the requests in the last `window_s`, plus `min_per_second` always. A
    failing fleet then answers 503 fast instead of being hammered by every request's retries."""

    ratio: float = Field(
        0.2, ge=0, le=1, description="Share of recent requests that may be retried."
    )
    min_per_second: float = Field(
        3.0, ge=0, description="Retries always allowed per second, however few requests came."
    )
    window_s: float = Field(10.0, gt=0, le=300, description="The window both count over.")


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
    load_floor: int = Field(
        2,
        ge=1,
        description="affinity: a replica may always hold this many requests in flight before "
        "its requests spill, whatever the mean: at low load the mean-based bound is too coarse "
        "to balance anything and spilling only costs cache hits.",
    )
    slow_start_s: float = Field(
        30.0,
        ge=0,
        description="A replica that comes back (health check passes again, or its ejection "
        "ends) takes a share of its weight growing from 10 % to 100 % over this many seconds, "
        "and the prefix groups that moved away return to it gradually; 0 turns it off.",
    )
    retry_budget: RetryBudgetSettings = Field(
        default_factory=lambda: RetryBudgetSettings(),
        description="How many requests may move to another replica after a failed connection.",
    )
    first_byte_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds a deployment has to deliver the first byte of its answer (a "
        "stream's first event; a whole answer's headers) before the request moves on to the "
        "next alias of `fallbacks`; none: the deployment's own `first_byte_timeout`.",
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
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Aliases tried in this order when this one cannot take a request (every "
        "deployment down, the engine answered 429 or 503, no first byte within "
        "`routing.first_byte_timeout_s`, the queue timed out); never once a byte has reached "
        "the client. Only this alias's own list is followed (docs/routing.md).",
    )


def _fallbacks(settings: Any) -> list[str]:
    """Every fallback names another alias of the same kind, once, that renders the request as
    this one does (the prompt was bound to the called alias's fill-in-the-middle template)."""
    errors = []
    for alias, model in settings.models.items():
        where = f"models.{alias}.fallbacks"
        for target in model.fallbacks:
            other = settings.models.get(target)
            if target == alias:
                errors.append(f"{where}: '{alias}' falls back to itself (a cycle)")
            elif other is None:
                errors.append(f"{where}: unknown model '{target}'")
            elif other.kind != model.kind:
                errors.append(
                    f"{where}: '{target}' is a {other.kind} model, '{alias}' a {model.kind} one"
                )
            elif other.fim != model.fim:
                errors.append(f"{where}: '{target}' has another fill-in-the-middle template")
        if len(set(model.fallbacks)) != len(model.fallbacks):
            errors.append(f"{where}: an alias is listed twice")
    return errors


section(
    "models",
    dict[Annotated[str, Field(pattern=NAME)], ModelSettings],
    "Model aliases clients call, each → deployments.",
    default_factory=dict,
    check=_fallbacks,
)


class HeaderMatch(Strict):
    name: str = Field(description="A request header (case-insensitive).")
    equals: str = Field(description="The value it must have, exactly.")


class RouterRule(Strict):
    """One rule of a router: every condition it sets must hold (at least one is required)."""

    name: str = Field(pattern=NAME, description="Shown in logs, metrics and the response header.")
    target: str = Field(description="The model alias a matching request goes to.")
    prompt_tokens_over: int | None = Field(
        None,
        ge=0,
        description="The prompt is longer than this many tokens (the target's tokenizer when "
        "it has one, else Bastion's upper bound: one token per UTF-8 byte).",
    )
    tools: bool | None = Field(None, description="The request declares tools (true) or none.")
    reasoning_effort: list[str] | None = Field(
        None, description="`reasoning_effort` (Responses: `reasoning.effort`) is one of these."
    )
    header: HeaderMatch | None = Field(None, description="A request header has this value.")
    teams: list[str] | None = Field(None, description="The caller's team is one of these.")


class RouterSettings(Strict):
    """A model name that is no model: it sends each request to one of its targets by rules."""

    rules: list[RouterRule] = Field(
        default_factory=list, description="Evaluated in order; the first that matches wins."
    )
    default: str = Field(description="The alias a request no rule matches goes to.")
    owned_by: str = Field("bastion", description="Shown in /v1/models.")

    @property
    def targets(self) -> list[str]:
        return [*(r.target for r in self.rules), self.default]


CONDITIONS = ("prompt_tokens_over", "tools", "reasoning_effort", "header", "teams")


def _routers(settings: Any) -> list[str]:
    errors = []
    for name, router in settings.routers.items():
        where = f"routers.{name}"
        if name in settings.models:
            errors.append(f"{where}: a model alias has this name")
        kinds = set()
        for target in router.targets:
            if target not in settings.models:
                errors.append(f"{where}: unknown model '{target}' (routers target models)")
            else:
                kinds.add(settings.models[target].kind)
        if len(kinds) > 1:
            errors.append(f"{where}: targets of different kinds ({', '.join(sorted(kinds))})")
        names = [r.name for r in router.rules]
        if len(set(names)) != len(names):
            errors.append(f"{where}: two rules have the same name")
        for i, rule in enumerate(router.rules):
            if all(getattr(rule, c) is None for c in CONDITIONS):
                errors.append(
                    f"{where}.rules[{i}]: no condition (one of {', '.join(CONDITIONS)}); "
                    "use `default` for the rest"
                )
    return errors


section(
    "routers",
    dict[Annotated[str, Field(pattern=NAME)], RouterSettings],
    "Routing aliases (e.g. `auto`): a model name whose requests go to one of several models "
    "by declared rules (docs/routing.md).",
    default_factory=dict,
    check=_routers,
)
