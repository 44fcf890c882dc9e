"""Wire APIs as adapters: each turns its own request body into the canonical `ParsedRequest`
the pipeline's stages read, builds the body the engine receives, and turns the engine's answer
(whole or streamed) back into its own format, assembling a stream for the audit trail and usage.

Adding a wire API (Anthropic Messages, OpenAI Responses, …) is adding an adapter here and its
route in `bastion.gateway.routes`; the stages stay as they are.
"""

from __future__ import annotations

from bastion.gateway.wire.base import Answer, StreamState, StreamTranslator, WireAdapter
from bastion.gateway.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS
from bastion.gateway.wire.responses import RESPONSES

#: Every wire API the gateway serves.
ADAPTERS: tuple[WireAdapter, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)

__all__ = ["ADAPTERS", "Answer", "StreamState", "StreamTranslator", "WireAdapter"]
