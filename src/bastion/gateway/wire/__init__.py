"""Wire APIs as adapters: each turns its own request body into the canonical `ParsedRequest`
the pipeline's stages read, builds the body the engine receives, and turns the engine's answer
(whole or streamed) back into its own format, assembling a stream for the audit trail and usage.

Adding a wire API (Anthropic Messages, OpenAI Responses, …) is adding an adapter here and its
route in `bastion.gateway.routes`; the stages stay as they are.
"""

from __future__ import annotations

from bastion.gateway.wire.anthropic import MESSAGES
from bastion.gateway.wire.anthropic_chat import COUNT_TOKENS
from bastion.gateway.wire.base import Answer, StreamState, StreamTranslator, WireAdapter
from bastion.gateway.wire.fim import FIM_CHAT, FIM_COMPLETIONS
from bastion.gateway.wire.openai import CHAT, EMBEDDINGS
from bastion.gateway.wire.rerank import RERANK, RERANK_ALIASES, SCORE
from bastion.gateway.wire.responses import RESPONSES

#: Every wire API the gateway serves (completions render fill-in-the-middle: wire/fim.py).
ADAPTERS: tuple[WireAdapter, ...] = (
    CHAT, FIM_COMPLETIONS, EMBEDDINGS, MESSAGES, COUNT_TOKENS, RESPONSES,
)  # fmt: skip
#: Rerank and score for retrieval pipelines (wire/rerank.py), and the alternative paths of an
#: API (listed first: where a name is looked up, its main path comes last and wins).
ADAPTERS = (FIM_CHAT, *RERANK_ALIASES, *ADAPTERS, RERANK, SCORE)

__all__ = ["ADAPTERS", "Answer", "StreamState", "StreamTranslator", "WireAdapter"]
