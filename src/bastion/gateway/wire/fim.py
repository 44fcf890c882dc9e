"""Fill-in-the-middle on `/v1/completions`: editor autocompletion (Tabby, Continue) sends the
code before the cursor as `prompt` and the code after it as `suffix`. vLLM renders `suffix`
only for the few models whose renderer implements FIM and refuses it (400) for the rest, so
Bastion renders the model's FIM template (`models.<alias>.fim`) into a plain prompt and
forwards that, without `suffix` (`fim: engine` passes it to an engine that renders it).

The audit trail records the request as the client sent it (prefix and suffix apart); limits
and budgets count the rendered prompt, which is what the engine reads.

Preset tokens, from each family's tokenizer and the clients that already use them
(docs/gateway.md cites the sources):

- qwen-coder (Qwen2.5-Coder): ``<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>``
- deepseek-coder: ``<|fim begin|>P<|fim hole|>S<|fim end|>``, written with full-width bars
  (U+FF5C) and U+2581 for the space
- starcoder (StarCoder, StarCoder2, StableCode): ``<fim_prefix>P<fim_suffix>S<fim_middle>``
- codestral: ``[SUFFIX]S[PREFIX]P`` (suffix first; the tokenizer adds the BOS)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import Headers

from bastion.core.errors import InvalidRequest
from bastion.core.request import ParsedRequest
from bastion.engines.settings import DeploymentSettings
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter
from bastion.gateway.wire.openai import Completions, OpenAIStream
from bastion.routing.settings import FimTemplate, ModelSettings

_BAR, _SP = "\uff5c", "\u2581"  # DeepSeek's tokens: full-width bar, "lower one eighth block"


def _deepseek(name: str) -> str:
    return f"<{_BAR}{name.replace(' ', _SP)}{_BAR}>"


PRESETS: dict[str, FimTemplate] = {
    "qwen-coder": FimTemplate(
        prefix="<|fim_prefix|>",
        suffix="<|fim_suffix|>",
        middle="<|fim_middle|>",
        # In order of need: only the first that fit beside the client's are sent (MAX_STOPS).
        stop=[
            "<|endoftext|>",
            "<|file_sep|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
        ],
    ),
    "deepseek-coder": FimTemplate(
        prefix=_deepseek("fim begin"),
        suffix=_deepseek("fim hole"),
        middle=_deepseek("fim end"),
        stop=[_deepseek(t) for t in ("end of sentence", "fim begin", "fim hole", "fim end")],
    ),
    "starcoder": FimTemplate(
        prefix="<fim_prefix>",
        suffix="<fim_suffix>",
        middle="<fim_middle>",
        stop=["<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    ),
    "codestral": FimTemplate(
        prefix="[PREFIX]", suffix="[SUFFIX]", middle="", order="spm", stop=["[PREFIX]", "[SUFFIX]"]
    ),
}


def template_of(model: ModelSettings) -> FimTemplate | None:
    fim = model.fim
    if fim == "engine":
        return None
    return PRESETS[fim] if isinstance(fim, str) else fim


def render(t: FimTemplate, prefix: str, suffix: str) -> str:
    if t.order == "spm":
        return f"{t.suffix}{suffix}{t.prefix}{prefix}{t.middle}"
    return f"{t.prefix}{prefix}{t.suffix}{suffix}{t.middle}"


@dataclass(slots=True)
class FimRequest(ParsedRequest):
    #: The template the request is rendered with; None: a plain completion.
    fim: FimTemplate | None = None

    def rendered(self) -> list[str]:
        """The prompt(s) the engine receives: one per prefix the client sent."""
        assert self.fim is not None
        prompt, suffix = self.body["prompt"], self.body["suffix"]
        prefixes = [prompt] if isinstance(prompt, str) else prompt
        return [render(self.fim, p, suffix) for p in prefixes]


#: Stop sequences an engine accepts (vLLM 0.32 refuses a fifth with 400, as OpenAI does).
MAX_STOPS = 4


def _stop(client: Any, extra: list[str]) -> list[str]:
    """The client's stops, then the template's while there is room: the client's own choice
    is never dropped (more than the engine takes is the engine's 400 to give)."""
    have = [client] if isinstance(client, str) else list(client or ())
    room = max(MAX_STOPS - len(have), 0)
    return have + [s for s in extra if s not in have][:room]


class FimCompletions(Completions):
    """`/v1/completions`, rendering a `suffix` with the model's FIM template."""

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        req = super().parse(raw, headers)
        suffix = req.body.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise InvalidRequest(
                "'suffix' must be a string or null", param="suffix", code="invalid_type"
            )
        return FimRequest(**{f.name: getattr(req, f.name) for f in dataclasses.fields(req)})

    def bind(self, req: ParsedRequest, model: ModelSettings) -> None:
        assert isinstance(req, FimRequest)
        body = req.body
        suffix = body.get("suffix")
        if suffix is None:
            body.pop("suffix", None)  # Tabby sends `"suffix": null`: nothing to fill in
            return
        if body.get("echo"):  # as vLLM: the echoed prompt would be the rendered one
            raise InvalidRequest(
                "'echo' is not supported with 'suffix'.", param="suffix", code="invalid_value"
            )
        if model.fim == "engine":
            return  # the engine renders the suffix itself
        template = template_of(model)
        if template is None:
            if suffix == "":  # nothing after the cursor: a plain completion means the same
                del body["suffix"]
                return
            raise InvalidRequest(
                f"The model '{req.model}' has no fill-in-the-middle template, so 'suffix' is "
                f"not supported (an administrator declares one in models.{req.model}.fim).",
                param="suffix",
                code="fim_not_supported",
            )
        prompt = body["prompt"]
        if not (isinstance(prompt, str) or all(isinstance(p, str) for p in prompt)):
            raise InvalidRequest(
                "With 'suffix', 'prompt' must be text (a string or an array of strings), "
                "not token ids.",
                param="prompt",
                code="invalid_type",
            )
        req.fim = template

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        # A raw prompt has no chat equivalent (a chat template would wrap the FIM tokens):
        # an engine without completions is a configuration error, said plainly.
        if not deployment.serves_natively("completions"):
            raise InvalidRequest(
                f"The engines of this model do not serve completions (deployments[].apis of "
                f"{deployment.display_url} lacks 'completions').",
                param="model",
                code="wrong_endpoint",
            )
        return self

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        if isinstance(req, FimRequest) and req.fim is not None:
            return req.rendered(), 0
        return super().prompt(req)

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        if not isinstance(req, FimRequest) or req.fim is None:
            return super().engine_body(req, served_name)
        # A copy: the body stays as the client sent it (retries on another deployment render
        # again), the engine gets the rendered prompt and no suffix.
        body = {k: v for k, v in req.body.items() if k != "suffix"}
        rendered = req.rendered()
        body["prompt"] = rendered[0] if isinstance(req.body["prompt"], str) else rendered
        if req.fim.stop:
            body["stop"] = _stop(body.get("stop"), req.fim.stop)
        return super().engine_body(dataclasses.replace(req, body=body), served_name)


def _as_chat(obj: dict[str, Any], stream: bool) -> None:
    """A completions answer or chunk → the chat-completion shape Mistral's FIM API answers in."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    obj["object"] = "chat.completion.chunk" if stream else "chat.completion"
    for ch in choices:
        if isinstance(ch, dict) and "text" in ch:
            text = ch.pop("text")
            if stream:
                ch["delta"] = {"content": text}
            else:
                ch["message"] = {"role": "assistant", "content": text}


class _ChatChunks(OpenAIStream):
    def event(self, event: bytes) -> bytes | None:
        if event.startswith(b"data:"):
            try:
                obj = orjson.loads(event[5:])
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                _as_chat(obj, stream=True)
                event = b"data: " + orjson.dumps(obj)
        return super().event(event)


class FimChatCompletions(FimCompletions):
    """`/v1/fim/completions` (Mistral's FIM API, which Continue's OpenAI adapter calls):
    `prompt` and `suffix` in, answered in the chat-completion shape, always rendered with the
    model's FIM template."""

    path = "/v1/fim/completions"

    def bind(self, req: ParsedRequest, model: ModelSettings) -> None:
        req.body.setdefault("suffix", "")
        if req.body["suffix"] is None:
            req.body["suffix"] = ""
        super().bind(req, model)
        if isinstance(req, FimRequest) and req.fim is None:  # "" on a model without FIM
            raise InvalidRequest(
                f"The model '{req.model}' has no fill-in-the-middle template "
                f"(models.{req.model}.fim), so it does not serve {self.path}.",
                param="model",
                code="fim_not_supported",
            )

    def answer(self, raw: bytes, alias: str) -> Answer:
        answer = super().answer(raw, alias)
        _as_chat(answer.content, stream=False)
        answer.body = orjson.dumps(answer.content)
        return answer

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return _ChatChunks(alias, req.client_wants_usage, collect)


FIM_COMPLETIONS = FimCompletions()
FIM_CHAT = FimChatCompletions()
