"""Precise prefix routing: the replica whose KV-cache events show the longest cached prefix of
the prompt, within the same load bound as affinity mode.

The gateway computes the block hashes vLLM computes for the prompt (engines started with
`--prefix-caching-hash-algo sha256_cbor`): the prompt's token ids in blocks of the engine's
block size; block i hashes sha256(CBOR([parent, token ids, extra keys])), where the parent of
the first block is sha256(CBOR(seed)), the seed being the engine's PYTHONHASHSEED or vLLM's
fixed default. Events carry the low 64 bits of each digest; so does the index.
(`kv_events.BlockIndex` maps them to replicas.)

When the index cannot decide (no events yet, no replica holds a block of this prompt, the
prompt cannot be tokenized here: images, LoRA adapters, other wire APIs), the request is routed
by an `Affinity` balancer, which also keeps learning from every request, so its ring and map
stay warm for those cases.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bastion.routing.affinity import Affinity
from bastion.routing.kv_events import BlockIndex

if TYPE_CHECKING:
    from bastion.core.request import ParsedRequest
    from bastion.routing.balancer import Deployment
    from bastion.routing.prompt_tokens import PromptTokens
    from bastion.routing.settings import ModelSettings, PreciseSettings

log = logging.getLogger("bastion.routing")

#: vLLM's NONE_HASH seed for cryptographic hash algorithms when PYTHONHASHSEED is unset.
DEFAULT_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


# -- CBOR (RFC 8949), only the types a block-hash input holds ---------------------------------
def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + struct.pack(">I", n)
    return bytes((major << 5 | 27,)) + struct.pack(">Q", n)


def cbor(value: Any) -> bytes:
    """Canonical CBOR of None, bools, ints, bytes, str and tuples/lists of them (what cbor2's
    `dumps(canonical=True)` writes for these types)."""
    if value is None:
        return b"\xf6"
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, bytes):
        return _head(2, len(value)) + value
    if isinstance(value, str):
        data = value.encode()
        return _head(3, len(data)) + data
    if isinstance(value, tuple | list):
        return _head(4, len(value)) + b"".join(cbor(v) for v in value)
    raise TypeError(f"no CBOR encoding here for {type(value).__name__}")


class _Encodings(dict[int, bytes]):
    """Token ids recur: their encodings are kept (bounded by the vocabulary)."""

    def __missing__(self, token: int) -> bytes:
        b = self[token] = cbor(token)
        return b


_UINT = _Encodings()


def none_hash(seed: str | None) -> bytes:
    return hashlib.sha256(cbor(seed if seed is not None else DEFAULT_SEED)).digest()


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    parent: bytes,
    first_extra: tuple[Any, ...] | None = None,
) -> list[int]:
    """The chained hashes of the prompt's full blocks, as 64-bit ints (as events carry them).
    `first_extra`: the first block's extra keys (e.g. (("cache_salt", salt),))."""
    out: list[int] = []
    extra = cbor(first_extra)
    array = _head(4, block_size)
    # Every block's CBOR at once (one join), then one digest per block: the Python-level
    # work per token is a dict look-up.
    end = len(tokens) - len(tokens) % block_size
    enc = list(map(_UINT.__getitem__, tokens[:end]))
    sha = hashlib.sha256
    for start in range(0, end, block_size):
        body = b"".join(enc[start : start + block_size])
        digest = sha(b"\x83\x58\x20" + parent + array + body + extra).digest()
        out.append(int.from_bytes(digest[-8:], "big"))
        parent = digest
        extra = b"\xf6"
    return out


@dataclass(slots=True)
class PreciseKey:
    """What precise routing routes by: the prompt's block hashes by block size (None: the
    index cannot decide) and affinity's key, for when it routes instead."""

    hashes: dict[int, list[int]] | None
    fallback: Any


#: A replica's engine-side view, from its /metrics (`engine_load.EngineLoad`), if scraped.
class LoadView:
    def load(self, deployment: Deployment) -> tuple[float, float]:
        """(requests running + waiting, KV-cache usage 0..1) per the engine; (0, 0) unknown."""
        return (0.0, 0.0)


class Precise:
    """A `Balancer` for one model's deployments: the index of its replicas' cached blocks."""

    def __init__(
        self,
        deployments: Sequence[Deployment],
        settings: PreciseSettings,
        load_factor: float = 1.25,
        tokens: PromptTokens | None = None,
        load_floor: int = 2,
    ):
        self._deps = list(deployments)
        self.load_factor = load_factor
        self.load_floor = load_floor
        self.min_blocks = settings.min_blocks
        self.index = BlockIndex(len(self._deps), settings.max_blocks)
        self.affinity = Affinity(self._deps, load_factor, load_floor)
        self.tokens = tokens
        self.engine: LoadView = LoadView()
        self._parent = none_hash(settings.hash_seed)
        self.failures = 0

    def key(self, req: ParsedRequest | None) -> PreciseKey | None:
        fallback = self.affinity.key(req)
        if req is None or len(self._deps) == 1:
            return PreciseKey(None, fallback)
        sizes = {b for b in self.index.block_size if b}
        if not sizes or self.tokens is None or not len(self.index):
            return PreciseKey(None, fallback)
        try:
            ids = self.tokens.of(req)
        except Exception as exc:  # a template the sandbox refuses, a malformed message
            self.failures += 1
            log.debug("precise routing: prompt not tokenized (%s); affinity instead", exc)
            return PreciseKey(None, fallback)
        if not ids:
            return PreciseKey(None, fallback)
        salt = req.body.get("cache_salt")
        extra = (("cache_salt", salt),) if isinstance(salt, str) and salt else None
        hashes = {b: block_hashes(ids, b, self._parent, extra) for b in sizes}
        return PreciseKey(hashes, fallback)

    def matched(self, key: PreciseKey) -> list[int]:
        """Blocks of the prompt each replica holds (leading, contiguous)."""
        assert key.hashes is not None
        per_size = {b: self.index.matches(h) for b, h in key.hashes.items()}
        sizes = self.index.block_size
        return [per_size[sizes[i]][i] if sizes[i] in per_size else 0 for i in range(len(sizes))]

    def order(
        self, deployments: Sequence[Deployment], key: PreciseKey | None = None
    ) -> list[tuple[Deployment, str]]:
        deps = self._deps
        if key is None or key.hashes is None:
            return self.affinity.order(deps, key.fallback if key else None)
        matched = self.matched(key)
        up = [i for i, d in enumerate(deps) if d.available]
        if not up or max(matched[i] for i in up) < self.min_blocks:
            return self.affinity.order(deps, key.fallback)
        best = max(matched[i] for i in up)
        # The load bound of affinity mode, ceil(load_factor * mean load) with this request
        # counted, per weight, over each replica's load: the larger of Bastion's in-flight
        # count (exact, but this gateway process only) and the engine's running + waiting
        # (every gateway's requests, but as of the last scrape).
        load = [max(float(d.in_flight), self.engine.load(d)[0]) for d in deps]
        total = sum(load[i] for i in up) + 1
        weight = sum(deps[i].effective_weight for i in up)
        fits = [
            i
            for i in up
            if load[i] + 1
            <= max(
                self.load_floor,
                math.ceil(self.load_factor * total * deps[i].effective_weight / weight),
            )
        ] or up
        # Near-equal cached prefixes go where affinity would send them, not to the less loaded
        # replica nor to one holding a few more blocks: either would copy prefixes into every
        # cache (vLLM evicts a prefix from its tail: its owner often holds most, not all),
        # shrinking what the caches hold together (measured: docs/benchmarks.md).
        near = best - max(self.min_blocks, best // 4)
        preferred = {d.index: n for n, (d, _) in enumerate(self.affinity.order(deps, key.fallback))}
        chosen = min(
            fits, key=lambda i: (0, preferred[i]) if matched[i] > near else (1, -matched[i])
        )
        reason = "cached-prefix" if matched[chosen] > near else "spill"

        def rank(i: int) -> tuple[float, ...]:
            return (-matched[i], load[i] / deps[i].effective_weight, self.engine.load(deps[i])[1])

        rest = sorted((i for i in up if i != chosen), key=rank)
        out = [(deps[chosen], reason)]
        out += [(deps[i], "fallback-to-available") for i in rest]
        out += [(d, "fallback-to-available") for i, d in enumerate(deps) if i not in up]
        return out

    def served(self, key: PreciseKey | None, deployment: Deployment, reason: str) -> None:
        if key is not None:
            self.affinity.served(key.fallback, deployment, reason)


def build_precise(alias: str, deps: Sequence[Deployment], settings: ModelSettings) -> Precise:
    """The model's precise balancer, with its tokenizer (`models.<alias>.tokenizer`)."""
    from bastion.config import ConfigError

    if settings.tokenizer is None:
        raise ConfigError(
            f"models.{alias}.routing.mode precise needs models.{alias}.tokenizer (the model's "
            "tokenizer directory, with its tokenizer_config.json chat template)"
        )
    try:
        from bastion.routing.prompt_tokens import PromptTokens

        tokens = PromptTokens(settings.tokenizer)
    except ImportError as exc:
        raise ConfigError(
            f"models.{alias}.routing.mode precise: {exc.name} is not installed "
            "(pip install 'bastion[precise]')"
        ) from None
    except Exception as exc:  # tokenizers and jinja2 raise their own kinds
        raise ConfigError(f"models.{alias}.tokenizer: cannot load it: {exc}") from None
    routing = settings.routing
    return Precise(deps, routing.precise, routing.load_factor, tokens, routing.load_floor)
