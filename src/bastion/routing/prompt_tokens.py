"""A request's prompt as the engine's token ids, computed in the gateway (for precise routing).

The engine's own `/tokenize` would be exact, but routing is decided synchronously
(`Balancer.key`) and a round trip to the engine costs more than tokenizing here (see
docs/routing.md, "Precise mode"). So the model's tokenizer (`models.<alias>.tokenizer`) and the
chat template in its tokenizer_config.json render the prompt as vLLM does: the template with
`add_generation_prompt` and the request's `tools`, then tokens without special tokens added
(chat); `/v1/completions` prompts are tokenized with them, as vLLM does.

Tokenizing is the cost (BPE in the event loop: ~2-5 us per token on these machines), so it is
cut twice. Only a leading part of the prompt matters (block hashes are chained): at most
`MAX_PREFIX_CHARS` are tokenized. And a tokenizer splits its input at its added tokens
(`<|im_start|>`, ...) before anything else, so the text between two of them always tokenizes
the same: those pieces are cached, and a conversation's turn pays for its new message only.
Anything this cannot render exactly as the engine would (images, audio, several prompts) gives
None, and the request is routed in affinity mode instead.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.core.request import ParsedRequest

#: Characters of rendered prompt tokenized per request (~16k tokens): a longer prefix seldom
#: changes which replica holds the most of it.
MAX_PREFIX_CHARS = 65536
#: Tokens dropped after a cut: the last word before it may tokenize differently in full.
CUT_MARGIN_TOKENS = 8
#: Cached pieces (text between two added tokens) and the characters they may hold in all.
PIECES = 4096
PIECE_CHARS = 8_000_000


class PromptTokens:
    """Token ids of chat and completion prompts for one model."""

    def __init__(self, tokenizer_path: str):
        from tokenizers import Tokenizer

        path = Path(tokenizer_path).expanduser()
        folder = path if path.is_dir() else path.parent
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json" if path.is_dir() else path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._specials = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        added = self._tok.get_added_tokens_decoder()
        self._added = {a.content: i for i, a in added.items()}
        # Splitting is exact only for added tokens matched verbatim, without stripping spaces
        # around them; otherwise whole texts are tokenized, uncached.
        verbatim = all(
            not (a.lstrip or a.rstrip or a.single_word or a.normalized) for a in added.values()
        )
        self._split = (
            re.compile("|".join(re.escape(c) for c in sorted(self._added, key=len, reverse=True)))
            if verbatim and self._added
            else None
        )
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
        self._piece_chars = 0
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self._template = _compile(template) if isinstance(template, str) else None

    def of(self, req: ParsedRequest) -> list[int] | None:
        """The prompt's leading token ids, or None when they cannot be known exactly here."""
        body = req.body
        if req.wire.name == "chat":
            text = self.render_chat(body)
            return None if text is None else self._encode(text, special=False)
        if req.wire.name == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return self._encode(prompt, special=True)
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
        return None

    def render_chat(self, body: dict[str, Any]) -> str | None:
        messages = body.get("messages")
        if self._template is None or not isinstance(messages, list):
            return None
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(
                not isinstance(p, dict) or p.get("type") != "text" for p in content
            ):
                return None  # images, audio: the engine adds multimodal keys to the hashes
        return self._template.render(
            messages=messages,
            tools=body.get("tools"),
            add_generation_prompt=True,
            **self._specials,
        )

    def _encode(self, text: str, *, special: bool) -> list[int]:
        cut = len(text) > MAX_PREFIX_CHARS
        text = text[:MAX_PREFIX_CHARS]
        if special or self._split is None:
            # With special tokens, the post-processor may add some around the whole text.
            ids = self._tok.encode(text, add_special_tokens=special).ids
        else:
            ids = []
            pos = 0
            for m in self._split.finditer(text):
                if m.start() > pos:
                    ids += self._piece(text[pos : m.start()])
                ids.append(self._added[m.group()])
                pos = m.end()
            if pos < len(text):
                ids += self._piece(text[pos:])
        return ids[:-CUT_MARGIN_TOKENS] if cut else ids

    def _piece(self, text: str) -> list[int]:
        pieces = self._pieces
        ids = pieces.get(text)
        if ids is not None:
            pieces.move_to_end(text)
            return ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        pieces[text] = ids
        self._piece_chars += len(text)
        while len(pieces) > PIECES or self._piece_chars > PIECE_CHARS:
            old, _ = pieces.popitem(last=False)
            self._piece_chars -= len(old)
        return ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def _compile(source: str) -> Any:
    """The template in a sandbox, configured as Hugging Face renders chat templates (trimmed
    blocks, loop controls, `tojson`, `raise_exception`)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
