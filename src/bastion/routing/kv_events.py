"""vLLM's KV-cache events, kept as an index of which replica holds which prompt block.

An engine started with `--kv-events-config` publishes, after each scheduler step that changed
its prefix cache, one multipart ZMQ message: topic, an 8-byte big-endian sequence number and a
msgpack `EventBatch` [ts, events, dp_rank] of `BlockStored` (hashes of blocks now cached,
chained from `parent_block_hash`), `BlockRemoved` (evicted) and `AllBlocksCleared`. Its optional
replay socket (ROUTER) answers a request for "everything from seq N" with the batches it still
buffers, then an end marker (seq -1).

One subscriber task per deployment keeps the model's `BlockIndex` up to date. Sequence numbers
say when something was missed: a gap is filled from the replay socket if there is one; if not
(or the batches are gone), the replica's entries are dropped and rebuilt from the next events
("resync"). A sequence that goes back means the engine restarted, with an empty cache: its
entries go too, as they do while health checks say the engine is down. The request path only
reads the index (dict look-ups); nothing here ever waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

if TYPE_CHECKING:
    from bastion.engines.settings import KvEventsSettings
    from bastion.routing.balancer import Deployment, ModelRoute

log = logging.getLogger("bastion.routing")

#: The replay socket's end-of-batches marker: sequence -1 as 8 signed big-endian bytes.
END_SEQ = b"\xff" * 8
#: Seconds to wait for the replay socket's answer before treating the gap as unrecoverable.
REPLAY_TIMEOUT = 2.0
#: How often an idle subscriber looks at its deployment's health.
POLL_MS = 1000
#: Only the device cache counts: blocks offloaded to CPU memory or storage must be loaded back.
PRIMARY_MEDIA = (None, "GPU")
_MASK64 = (1 << 64) - 1


# -- the wire protocol (only the fields routing reads; unknown fields are ignored) -------------
class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    block_size: int = 0
    medium: str | None = None
    group_idx: int | None = None
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _RawBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_batch = msgspec.msgpack.Decoder(_RawBatch)
_event = msgspec.msgpack.Decoder(Event)


def decode_batch(payload: bytes) -> EventBatch:
    """The batch's events that routing knows; other kinds (newer engines) are skipped."""
    raw = _batch.decode(payload)
    events: list[Event] = []
    for e in raw.events:
        try:
            events.append(_event.decode(e))
        except msgspec.ValidationError:
            continue
    return EventBatch(raw.ts, events, raw.data_parallel_rank)


def as_key(h: int | bytes) -> int:
    """A block hash as vLLM publishes it by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES: the
    low 64 bits of the digest) whichever form the engine sent."""
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    return h & _MASK64


class BlockIndex:
    """Which replicas hold each block (one index per model). A hash maps to a bit mask of
    replica indexes; each replica also keeps its own hashes, oldest first, so that it can be
    dropped at once and trimmed when the total passes `max_blocks` (missed removals cannot grow
    it without bound)."""

    def __init__(self, replicas: int, max_blocks: int = 1_000_000):
        self.max_blocks = max_blocks
        self._owners: dict[int, int] = {}
        self._held: list[dict[int, None]] = [{} for _ in range(replicas)]
        #: The block size (tokens) each replica's events report; 0 until its first BlockStored.
        self.block_size = [0] * replicas
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def blocks(self, replica: int) -> int:
        return len(self._held[replica])

    def store(self, replica: int, hashes: list[int]) -> None:
        bit = 1 << replica
        held = self._held[replica]
        owners = self._owners
        for h in hashes:
            if h in held:
                # Re-stored (a prefix-cache hit re-announced): now the newest.
                del held[h]
                held[h] = None
                continue
            held[h] = None
            owners[h] = owners.get(h, 0) | bit
            self._total += 1
        if self._total > self.max_blocks:
            self._trim()

    def remove(self, replica: int, hashes: list[int]) -> None:
        held = self._held[replica]
        for h in hashes:
            if h in held:
                del held[h]
                self._drop(h, replica)

    def clear(self, replica: int) -> int:
        """Forgets everything the replica holds; returns how many blocks that was."""
        held = self._held[replica]
        n = len(held)
        for h in held:
            self._drop(h, replica)
        self._held[replica] = {}
        return n

    def _drop(self, h: int, replica: int) -> None:
        mask = self._owners.get(h, 0) & ~(1 << replica)
        if mask:
            self._owners[h] = mask
        else:
            self._owners.pop(h, None)
        self._total -= 1

    def _trim(self) -> None:
        """Drops the oldest entries of the replica holding the most, until within bounds."""
        while self._total > self.max_blocks:
            replica = max(range(len(self._held)), key=lambda r: len(self._held[r]))
            held = self._held[replica]
            for _ in range(min(len(held), self._total - self.max_blocks)):
                h = next(iter(held))
                del held[h]
                self._drop(h, replica)

    def matches(self, hashes: list[int]) -> list[int]:
        """For each replica, how many leading blocks of `hashes` it holds (hashes are chained,
        so a block counts only if every block before it is held too)."""
        found = [0] * len(self._held)
        alive = (1 << len(self._held)) - 1
        owners = self._owners
        for i, h in enumerate(hashes):
            mask = alive & owners.get(h, 0)
            lost = alive & ~mask
            while lost:
                bit = lost & -lost
                found[bit.bit_length() - 1] = i
                lost ^= bit
            alive = mask
            if not alive:
                return found
        while alive:
            bit = alive & -alive
            found[bit.bit_length() - 1] = len(hashes)
            alive ^= bit
        return found

    def apply(self, replica: int, batch: EventBatch) -> None:
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                if ev.medium in PRIMARY_MEDIA and not ev.group_idx:
                    if ev.block_size:
                        self.block_size[replica] = ev.block_size
                    self.store(replica, [as_key(h) for h in ev.block_hashes])
            elif isinstance(ev, BlockRemoved):
                if ev.medium in PRIMARY_MEDIA and not ev.group_idx:
                    self.remove(replica, [as_key(h) for h in ev.block_hashes])
            elif isinstance(ev, AllBlocksCleared):
                self.clear(replica)


class Subscriber:
    """One deployment's event stream into its model's index. `state` is what routing status
    shows: waiting (no batch seen yet), live, or down (engine down: its entries dropped)."""

    def __init__(
        self,
        deployment: Deployment,
        settings: KvEventsSettings,
        index: BlockIndex,
        on_resync: Callable[[Deployment, str], None] | None = None,
        on_batch: Callable[[Deployment, int], None] | None = None,
    ):
        self.deployment = deployment
        self.settings = settings
        self.index = index
        self.state = "waiting"
        self.expected: int | None = None
        self.resyncs = 0
        self._on_resync = on_resync
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None

    @property
    def replica(self) -> int:
        return self.deployment.index

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.deployment.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        while True:
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                if self.settings.bind:
                    sock.bind(self.settings.endpoint)
                else:
                    sock.connect(self.settings.endpoint)
                sock.setsockopt(zmq.SUBSCRIBE, self.settings.topic.encode())
                if self.settings.replay_endpoint is not None:
                    # What the engine cached before we subscribed: its replay buffer, from 0.
                    await self._catch_up(0)
                while True:
                    if await sock.poll(POLL_MS):
                        frames = await sock.recv_multipart()
                        if len(frames) == 3:
                            await self.receive(int.from_bytes(frames[1], "big"), frames[2])
                    elif self.deployment.healthy is False and self.state != "down":
                        self.resync("down")
                        self.state = "down"
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "kv events of %s: subscriber failed; restarting", self.deployment.name
                )
                await asyncio.sleep(1.0)
            finally:
                sock.close(linger=0)

    async def receive(self, seq: int, payload: bytes) -> None:
        """One batch off the publisher socket, checked against the expected sequence. A gap is
        filled from the replay socket (later batches wait in the SUB socket meanwhile)."""
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            log.warning("kv events of %s: undecodable batch %d", self.deployment.name, seq)
            self.resync("undecodable")
            self.expected = seq + 1
            return
        expected = self.expected
        if expected is None and seq > 0 and self.settings.replay_endpoint is not None:
            # First batch since (re)connecting: what came before it, if still buffered.
            await self._catch_up(0, until=seq)
        elif expected is not None and seq < expected:
            # The sequence went back: a new engine process, with an empty cache.
            self.resync("restart")
            if seq > 0 and self.settings.replay_endpoint is not None:
                self.expected = None
                await self._catch_up(0, until=seq)
        elif expected is not None and seq > expected:
            if self.settings.replay_endpoint is not None:
                await self._catch_up(expected, until=seq)
            if self.expected is not None and self.expected < seq:
                self.resync("gap")
        self._apply(seq, batch)

    def _apply(self, seq: int, batch: EventBatch) -> None:
        self.index.apply(self.replica, batch)
        self.expected = seq + 1
        self.state = "live"
        if self._on_batch is not None:
            self._on_batch(self.deployment, len(batch.events))

    def resync(self, reason: str) -> None:
        """Forgets the replica's blocks: what it holds is no longer known (or is gone)."""
        dropped = self.index.clear(self.replica)
        self.resyncs += 1
        if reason == "down":
            self.expected = None
        log.info(
            "kv events of %s: %s, %d block(s) forgotten", self.deployment.name, reason, dropped
        )
        if self._on_resync is not None:
            self._on_resync(self.deployment, reason)

    async def _catch_up(self, start: int, until: int | None = None) -> None:
        """Applies the replay socket's batches from `start` (below `until`, if given)."""
        import zmq
        import zmq.asyncio

        assert self.settings.replay_endpoint is not None
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.settings.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(REPLAY_TIMEOUT):
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) != 4 or frames[2] == END_SEQ:
                        break
                    seq = int.from_bytes(frames[2], "big")
                    if until is not None and seq >= until:
                        break
                    if self.expected is not None and seq > self.expected:
                        break  # the engine no longer buffers what was missed
                    if self.expected is None or seq == self.expected:
                        self._apply(seq, decode_batch(frames[3]))
            if self.expected is None:
                # Nothing buffered: an engine that has cached nothing yet, known to be empty.
                self.state = "live"
        except TimeoutError:
            log.warning("kv events of %s: replay socket did not answer", self.deployment.name)
        finally:
            sock.close(linger=0)


class KvEventHub:
    """Every precise-mode model's subscribers, their metrics and their status fields."""

    def __init__(self, routes: Iterable[ModelRoute], registry: CollectorRegistry):
        from bastion.config import ConfigError
        from bastion.routing.precise import Precise

        try:  # at start-up, not in a subscriber task that would die quietly
            import zmq.asyncio  # noqa: F401
        except ImportError:
            raise ConfigError(
                "routing.mode precise needs pyzmq (pip install 'bastion[precise]')"
            ) from None

        self._batches = Counter(
            "bastion_kv_event_batches",
            "KV-cache event batches received from each deployment's engine.",
            ["deployment"],
            registry=registry,
        )
        self._resyncs = Counter(
            "bastion_kv_event_resyncs",
            "Times a deployment's cached blocks were forgotten: gap (missed batches and no "
            "replay), restart (its sequence went back), down (health checks), undecodable.",
            ["deployment", "reason"],
            registry=registry,
        )
        self.subscribers: dict[str, Subscriber] = {}
        for route in routes:
            if not isinstance(route.balancer, Precise):
                continue
            for dep in route.deployments:
                if dep.settings.kv_events is not None:
                    self.subscribers[dep.name] = Subscriber(
                        dep,
                        dep.settings.kv_events,
                        route.balancer.index,
                        on_resync=lambda d, why: self._resyncs.labels(d.name, why).inc(),
                        on_batch=lambda d, _n: self._batches.labels(d.name).inc(),
                    )

    def row(self, deployment: Deployment) -> dict[str, Any]:
        sub = self.subscribers.get(deployment.name)
        if sub is None:  # the same columns for every row (tables, CSV)
            return dict.fromkeys(
                ("kv_events", "kv_events_seq", "cached_blocks", "kv_event_resyncs")
            )
        return {
            "kv_events": sub.state,
            # The last batch applied: compare with the engine's replay buffer to see lag.
            "kv_events_seq": sub.expected - 1 if sub.expected is not None else None,
            "cached_blocks": sub.index.blocks(sub.replica),
            "kv_event_resyncs": sub.resyncs,
        }

    async def start(self) -> None:
        for sub in self.subscribers.values():
            await sub.start()

    async def stop(self) -> None:
        for sub in self.subscribers.values():
            await sub.stop()
