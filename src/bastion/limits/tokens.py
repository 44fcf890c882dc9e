"""Counting a request's prompt tokens for its reservation.

With `models.<alias>.tokenizer` set, the model's own tokenizer counts the text, in a worker
thread (never on the event loop). Without it, every UTF-8 byte counts as one token: a token is
never shorter than a byte, so this is an upper bound, and the reservation is settled to the
engine's exact count after the response anyway.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bastion.config import ConfigError, Settings
from bastion.core.request import ParsedRequest


def prompt_upper_bound(req: ParsedRequest) -> int:
    texts, extra = req.prompt()
    return extra + sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


class PromptCounter:
    def __init__(self, settings: Settings):
        self._tokenizers: dict[str, Any] = {}
        for alias, model in settings.models.items():
            if model.tokenizer is not None:
                self._tokenizers[alias] = _load(alias, model.tokenizer)

    async def count(self, req: ParsedRequest, alias: str | None = None) -> int:
        """The prompt's tokens by the tokenizer of `alias` (default: the model called)."""
        tok = self._tokenizers.get(alias or req.model)
        if tok is None:
            return prompt_upper_bound(req)
        texts, extra = req.prompt()
        if not texts:
            return extra
        encoded = await asyncio.to_thread(tok.encode_batch, texts, add_special_tokens=False)
        return extra + sum(len(e.ids) for e in encoded)


def _load(alias: str, where: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            f"models.{alias}.tokenizer: the `tokenizers` package is not "
            "installed (pip install 'bastion[tokenizers]')"
        ) from None
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for unreadable files
        raise ConfigError(f"models.{alias}.tokenizer: cannot load {path}: {exc}") from None
