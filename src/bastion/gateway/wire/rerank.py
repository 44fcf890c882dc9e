"""Rerank and score for retrieval pipelines: `/v1/rerank` (Cohere/Jina shape: `query`,
`documents`, `top_n`) and `/v1/score` (`text_1`/`text_2`, or `queries`/`documents`), as vLLM
serves them for cross-encoder models (`models.<alias>.kind: rerank`). vLLM's own aliases
`/rerank` and `/v2/rerank` are accepted too.

The body passes to the engine as the client sent it, with only the model name replaced; the
answer comes back with the alias for the served name. Nothing is generated: limits and budgets
reserve the prompt alone, which for a cross-encoder is the query read once per document.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.datastructures import Headers

from bastion.core.errors import BastionError, InvalidRequest
from bastion.core.request import ParsedRequest
from bastion.engines.client import read_usage
from bastion.engines.settings import DeploymentSettings
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter, engine_json_object
from bastion.gateway.wire.openai import UNSIZED_PART, _model, _read_body, _type_error

#: The special tokens a cross-encoder puts round each (query, document) pair ([CLS], [SEP] twice).
PAIR_OVERHEAD = 4


def _texts(value: Any, param: str) -> list[Any]:
    """A string or an array of strings (or of content objects, e.g. images): as a list."""
    if isinstance(value, str | dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str | dict) for v in value):
        return value
    raise _type_error(param, "a string or a non-empty array of strings")


def _count(items: list[Any], texts: list[str]) -> int:
    """Adds the strings to `texts`; returns the tokens of parts it cannot size."""
    extra = 0
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            extra += UNSIZED_PART
    return extra


class _Pairs(WireAdapter):
    """What rerank and score share: one query (or several) against documents, no output."""

    serves = ("rerank", "embedding")
    #: The body's query and documents fields, in the order the engine pairs them.
    fields: tuple[tuple[str, str], ...]

    def __init__(self, path: str, engine_path: str):
        self.path, self.engine_path = path, engine_path

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        body = _read_body(raw)
        model = _model(body)
        pair = next(((q, d) for q, d in self.fields if q in body or d in body), self.fields[0])
        for param in pair:
            if param not in body:
                raise InvalidRequest(
                    f"'{param}' is a required property", param=param, code="missing"
                )
            _texts(body[param], param)
        if body.get("stream"):
            raise InvalidRequest(
                f"{self.path} cannot be streamed", param="stream", code="invalid_value"
            )
        top_n = body.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)):
            raise _type_error("top_n", "an integer")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise _type_error("user", "a string")
        return ParsedRequest(
            self,
            body,
            model,
            False,
            client_user=user,
            generates=False,
            fields=frozenset(body),
            session=headers.get("x-session-affinity") or None,
        )

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        pair = next((q, d) for q, d in self.fields if q in req.body)
        queries = _texts(req.body[pair[0]], pair[0])
        documents = _texts(req.body[pair[1]], pair[1])
        # Every query is read with every document it is paired with (score pairs them 1:1
        # when both are arrays; counting all pairs stays an upper bound either way).
        pairs = len(documents) if len(queries) == 1 else max(len(queries), len(documents))
        texts: list[str] = []
        extra = _count(documents, texts) + PAIR_OVERHEAD * pairs
        for _ in range(pairs if len(queries) == 1 else 1):
            extra += _count(queries, texts)
        return texts, extra

    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        """Nothing is generated: there is no ceiling to write."""

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        # A ranking cannot be made from chat completions: an engine without the API is a
        # configuration the client cannot fix, said plainly instead of the engine's 404.
        if not deployment.serves_natively(self.name):
            raise InvalidRequest(
                f"The engines of this model do not serve {self.path} "
                f"(deployments[].apis of {deployment.display_url} lacks '{self.name}').",
                param="model",
                code="wrong_endpoint",
            )
        return self

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        req.body["model"] = served_name
        return orjson.dumps(req.body)

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        engine_model = obj.get("model")
        if "model" in obj:
            obj["model"] = alias
        return Answer(orjson.dumps(obj), read_usage(obj.get("usage")), engine_model, obj)

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        raise BastionError(f"{self.path} cannot be streamed")  # parse refuses `stream` first


class Rerank(_Pairs):
    name = "rerank"
    fields = (("query", "documents"),)


class Score(_Pairs):
    name = "score"
    fields = (("text_1", "text_2"), ("queries", "documents"), ("data_1", "data_2"))


RERANK = Rerank("/v1/rerank", "/v1/rerank")
#: vLLM's aliases of the same API (Jina's and Cohere's v2 paths).
RERANK_ALIASES = (Rerank("/rerank", "/v1/rerank"), Rerank("/v2/rerank", "/v1/rerank"))
SCORE = Score("/v1/score", "/v1/score")
