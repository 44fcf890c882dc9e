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


class Affinity:
    """A `Balancer` for one model's deployments (its ring and learned map are per model)."""

    def __init__(self, deployments: Sequence[Deployment], load_factor: float = 1.25):
        self.load_factor = load_factor
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
            ranked = sorted(deps, key=lambda d: (not d.available, d.in_flight / d.settings.weight))
            return [(ranked[0], "least-loaded")] + [
                (d, "fallback-to-available") for d in ranked[1:]
            ]
        target: int | None = None
        if key.session is not None:
            walk, reason = self._walk(_h64(key.session.encode())), "session"
        else:
            walk, reason = self._walk(key.blocks[0]), "ring"
            learned = self._learned
            for h in reversed(key.blocks):
                target = learned.get(h)
                if target is not None:
                    reason = "prefix"
                    break
        if target is not None and walk[0] != target:
            walk = (target, *(i for i in walk if i != target))
        up = [i for i in walk if deps[i].available]
        if not up:  # nothing known to be up: try them all in ring order
            rest = [(deps[i], "fallback-to-available") for i in walk[1:]]
            return [(deps[walk[0]], reason), *rest]
        total = sum(deps[i].in_flight for i in up) + 1
        weight = sum(deps[i].settings.weight for i in up)
        chosen = up[0]
        for i in up:
            cap = math.ceil(self.load_factor * total * deps[i].settings.weight / weight)
            if deps[i].in_flight + 1 <= cap:
                chosen = i
                break
        if chosen != walk[0]:
            reason = "spill" if deps[walk[0]].available else "fallback-to-available"
        out = [(deps[chosen], reason)]
        out += [(deps[i], "fallback-to-available") for i in walk if i != chosen and i in up]
        out += [(deps[i], "fallback-to-available") for i in walk if i not in up]
        return out

    def served(self, key: Key | None, deployment: Deployment, reason: str) -> None:
        """Learns where a prompt's blocks went. A spill adds only blocks not known yet: the
        prefix stays with its replica, the conversation that spilled follows its own tail."""
        if key is None or not key.blocks:
            return
        learned = self._learned
        index = deployment.index
        keep = reason == "spill"
        for h in key.blocks:
            if keep and h in learned:
                learned.move_to_end(h)
            else:
                learned[h] = index
                learned.move_to_end(h)
        while len(learned) > LEARNED_BLOCKS:
            learned.popitem(last=False)
