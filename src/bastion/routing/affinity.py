"""Prefix-affinity routing (approximate): send requests that share a prompt prefix, or a session,
to the replica that most likely still holds that prefix's KV cache, within a load bound.

Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a ring of virtual
nodes assigns every prefix an owner; a replica may take a request only while its in-flight count
stays within `ceil(c * mean)`, the mean taken over the available replicas counting this request;
past that the request spills to the next replica on the ring. On top of the ring, a bounded LRU
map learns where each prompt block went, so a conversation follows the replica that holds its
longest known prefix, even after a spill or a failover moved it.

Nothing here talks to an engine: it works with any engine. The ring is built from the
deployments' URLs with a keyed-free hash (blake2b), so several gateway replicas agree on owners.
"""

from __future__ import annotations

import math
from bisect import bisect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from bastion.core.request import ParsedRequest
    from bastion.routing.balancer import Deployment

#: Bytes of serialised prompt per block. Small enough that a suffix edit loses little; large
#: enough that a 100k-token prompt is a few hundred hashes.
BLOCK_BYTES = 256
#: Blocks hashed per request (64 KiB of prompt): a longer prefix tells routing nothing more.
MAX_BLOCKS = 256
#: Virtual nodes per unit of weight: enough for an even split across a handful of replicas.
VNODES = 64
#: Block hashes remembered per model (about 80 bytes each).
LEARNED_BLOCKS = 200_000
#: Leading body fields, in the order an engine renders them: what most prompts share.
PREFIX_FIELDS = ("system", "instructions", "tools", "messages", "input", "prompt", "query")

_DUMP_OPTS = orjson.OPT_SORT_KEYS


def _h64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def prefix_blocks(body: dict[str, Any]) -> list[int]:
    """Chained hashes of the prompt's leading bytes in BLOCK_BYTES blocks: hash i covers blocks
    0..i, so equal hashes mean equal prefixes. Serialised part by part (sorted keys: clients do
    not agree on key order) and only as far as MAX_BLOCKS reaches; the last, partial block is
    dropped (it is where requests differ)."""
    limit = BLOCK_BYTES * MAX_BLOCKS
    parts: list[bytes] = []
    size = 0
    for name in PREFIX_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        items = value if isinstance(value, list) and name != "tools" else (value,)
        for item in items:
            chunk = orjson.dumps(item, option=_DUMP_OPTS) if not isinstance(item, str) else None
            data = chunk if chunk is not None else item.encode()
            parts.append(data + b"\x1e")
            size += len(data) + 1
            if size >= limit:
                break
        if size >= limit:
            break
    text = b"".join(parts)
    end = min(len(text), limit) - BLOCK_BYTES + 1
    if end <= 0:
        return []
    # The first block's hash places the prefix on the ring, so it is the same in every gateway
    # process; the chain after it only meets this process's own map, so it uses the built-in
    # (SipHash) hash: four times faster than blake2b per block.
    prev = _h64(text[:BLOCK_BYTES])
    blocks = [prev]
    for start in range(BLOCK_BYTES, end, BLOCK_BYTES):
        prev = hash((prev, text[start : start + BLOCK_BYTES]))
        blocks.append(prev)
    return blocks


@dataclass(slots=True)
class Key:
    """What affinity routes by, computed once per request."""

    session: str | None
    blocks: list[int]
    #: Set by `order`: the learned replica holds this prefix only because its owner was down or
    #: warming up (the group returns to the owner once it is back).
    displaced: bool = False

    @property
    def point(self) -> int:
        """Where the key sits on the ring."""
        return _h64(self.session.encode()) if self.session is not None else self.blocks[0]

    @property
    def rank(self) -> float:
        """A fixed number in [0, 1) per key: during a replica's slow-start, the keys ranked
        below its warmth go (or return) to it. Fixed, so a key moves once, never back and forth."""
        return ((self.point * 0x9E3779B97F4A7C15) >> 40 & 0xFFFFFF) / 0x1000000


class Affinity:
    """A `Balancer` for one model's deployments (its ring and learned map are per model)."""

    def __init__(
        self, deployments: Sequence[Deployment], load_factor: float = 1.25, load_floor: int = 2
    ):
        self.load_factor = load_factor
        self.load_floor = load_floor
        self._deps = list(deployments)
        self._learned: OrderedDict[int, int] = OrderedDict()
        points: list[tuple[int, int]] = []
        for i, d in enumerate(self._deps):
            for v in range(max(1, round(VNODES * d.settings.weight))):
                points.append((_h64(f"{d.settings.url}#{v}".encode()), i))
        points.sort()
        self._points = [p for p, _ in points]
        # For each ring slot, the distinct replicas met walking clockwise from it: the ring
        # order is a table look-up, not a walk, per request.
        owners = [i for _, i in points]
        n = len(self._deps)
        self._walks: list[tuple[int, ...]] = []
        for s in range(len(owners)):
            seen: list[int] = []
            j = s
            while len(seen) < n:
                if owners[j] not in seen:
                    seen.append(owners[j])
                j = (j + 1) % len(owners)
            self._walks.append(tuple(seen))

    def key(self, req: ParsedRequest | None) -> Key | None:
        if req is None or len(self._deps) == 1:
            return None
        if req.session:
            return Key(req.session, [])
        return Key(None, prefix_blocks(req.body))

    def _walk(self, point: int) -> tuple[int, ...]:
        return self._walks[bisect(self._points, point) % len(self._points)]

    def order(
        self, deployments: Sequence[Deployment], key: Key | None = None
    ) -> list[tuple[Deployment, str]]:
        deps = self._deps
        if len(deps) == 1:
            return [(deps[0], "only")]
        if key is None or (key.session is None and not key.blocks):
            # Nothing to be affine to (no prompt prefix of a full block): the least loaded.
            ranked = sorted(deps, key=lambda d: (not d.available, d.in_flight / d.effective_weight))
            return [(ranked[0], "least-loaded")] + [
                (d, "fallback-to-available") for d in ranked[1:]
            ]
        walk = self._walk(key.point)
        owner = deps[walk[0]]
        reason = "session" if key.session is not None else "ring"
        target, key.displaced = self._learned_target(key)
        if target is not None and target != walk[0]:
            if key.displaced and owner.available and key.rank < owner.warmth:
                reason = "return"  # its owner is back: the group goes home
            else:
                walk, reason = (target, *(i for i in walk if i != target)), "prefix"
        elif target is not None:
            reason = "prefix"
        if reason in ("session", "ring") and owner.available and key.rank >= owner.warmth:
            # The owner is in slow-start and this key is not yet among those it takes.
            walk, reason = (*walk[1:], walk[0]), "slow-start"
        up = [i for i in walk if deps[i].available]
        if not up:  # nothing known to be up: try them all in ring order
            rest = [(deps[i], "fallback-to-available") for i in walk[1:]]
            return [(deps[walk[0]], reason), *rest]
        chosen = self._within_bound(up)
        if chosen != walk[0]:
            reason = "spill" if deps[walk[0]].available else "fallback-to-available"
        out = [(deps[chosen], reason)]
        out += [(deps[i], "fallback-to-available") for i in walk if i != chosen and i in up]
        out += [(deps[i], "fallback-to-available") for i in walk if i not in up]
        return out

    def _learned_target(self, key: Key) -> tuple[int | None, bool]:
        """The replica that served the longest known prefix of the key, and whether it holds it
        only because the owner was unavailable. Learned values are the replica index, negated
        (minus one) for displaced groups."""
        if key.session is not None:
            return None, False
        learned = self._learned
        for h in reversed(key.blocks):
            value = learned.get(h)
            if value is not None:
                return (value, False) if value >= 0 else (-value - 1, True)
        return None, False

    def _within_bound(self, up: list[int]) -> int:
        """The first replica in `up` (preference order) whose in-flight count stays within its
        bound with this request: `ceil(load_factor * total * share)`, share by effective weight,
        but never below `load_floor`. The last resort is the first one."""
        deps = self._deps
        total = sum(deps[i].in_flight for i in up) + 1
        weight = sum(deps[i].effective_weight for i in up)
        for i in up:
            d = deps[i]
            cap = max(
                self.load_floor, math.ceil(self.load_factor * total * d.effective_weight / weight)
            )
            if d.in_flight + 1 <= cap:
                return i
        return up[0]

    def served(self, key: Key | None, deployment: Deployment, reason: str) -> None:
        """Learns where a prompt's blocks went. A spill adds only blocks not known yet: the
        prefix stays with its replica, the conversation that spilled follows its own tail. A
        group moved because its owner was down or warming up is learned as displaced."""
        if key is None or not key.blocks:
            return
        learned = self._learned
        keep = reason == "spill"
        displaced = reason in ("fallback-to-available", "slow-start") or (
            reason == "prefix" and key.displaced
        )
        value = -deployment.index - 1 if displaced else deployment.index
        for h in key.blocks:
            if not (keep and h in learned):
                learned[h] = value
            learned.move_to_end(h)
        while len(learned) > LEARNED_BLOCKS:
            learned.popitem(last=False)
