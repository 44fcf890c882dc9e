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
from bastion.gateway.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS

#: Every wire API the gateway serves.
ADAPTERS: tuple[WireAdapter, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, COUNT_TOKENS)

__all__ = ["ADAPTERS", "Answer", "StreamState", "StreamTranslator", "WireAdapter"]
