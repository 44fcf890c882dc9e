"""The audit trail as the gateway sees it: one call before forwarding, one when the answer ends.

`request` returns only once the request's entry is durable in the local log; if it cannot be
written the request is refused (`audit.on_failure: closed`, the default) or, in development
only, forwarded with an error log and a metric (`open`). Contents are redacted (if configured)
and sealed with the team's data key before they reach the log; the metadata auditors search by
stays in clear. Startup ships what an earlier run left in the log and marks the requests that
run never finished as aborted, so every accepted request ends with a completion entry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from bastion import __version__
from bastion.audit import anchor, store
from bastion.audit.chain import canonical, content_digest, public_key_hex
from bastion.audit.crypto import KeyWrapper, commitment, seal
from bastion.audit.keys import check_master_key, load_master_key, load_signing_key
from bastion.audit.redact import Redactor
from bastion.audit.ship_process import ShipperProcess
from bastion.audit.shipper import Shipper
from bastion.audit.wal import AuditLog, AuditLogError
from bastion.config import Settings
from bastion.core.errors import AuditUnavailable
from bastion.identity.principal import Principal
from bastion.metering.usage import UsageRecord
from bastion.observability.metrics import Metrics
from bastion.store.db import durability_problem

log = logging.getLogger("bastion.audit")
#: Contents larger than this are redacted and sealed in a worker thread, off the event loop.
OFFLOAD_BYTES = 64 * 1024


def seal_context(entry: dict[str, Any]) -> bytes:
    """What a sealed content is bound to: moving it to another entry makes it unreadable."""
    return f"{entry.get('request_id')}:{entry.get('kind')}".encode()


class TeamKeys:
    """Each team's data key, unwrapped once and cached; destroyed or rotated keys leave it.
    `reload`: re-reads the master key on every refresh, so a rotation done elsewhere is
    followed within `identity.key_refresh_seconds` (new data keys are wrapped by the new key)."""

    def __init__(
        self, db: Engine, wrapper: KeyWrapper, reload: Callable[[], KeyWrapper] | None = None
    ):
        self.db, self.wrapper, self.reload = db, wrapper, reload
        self.cache: dict[str, store.DataKey] = {}

    async def get(self, team: str) -> store.DataKey:
        key = self.cache.get(team)
        if key is None:
            key = await asyncio.to_thread(store.current_key, self.db, team, self.wrapper)
            self.cache[team] = key
        return key

    def refresh(self) -> None:
        if self.reload is not None:
            self.wrapper = self.reload()
        current = store.current_key_ids(self.db)  # shredded or rotated keys leave the cache
        self.cache = {t: k for t, k in self.cache.items() if current.get(t) == k.id}


class AuditTrail:
    def __init__(self, settings: Settings, db: Engine, metrics: Metrics, port: int):
        self.settings = a = settings.audit
        # Recorded at every start: who may do what is part of the evidence.
        self.policy = {
            "group_mappings": [m.model_dump() for m in settings.identity.group_mappings],
            "oidc_issuers": [(i.issuer, i.audience) for i in settings.identity.oidc],
            "teams": {
                name: {
                    "cost_center": t.cost_center,
                    "models": t.models,
                    "audit_retention_days": t.audit_retention_days,
                }
                for name, t in settings.teams.items()
            },
            # How this replica records: an auditor sees from the trail itself whether it was
            # failing closed, what it redacted and how long contents are kept.
            "audit": {
                "on_failure": a.on_failure,
                "redact": list(a.redact),
                "redact_upstream": a.redact_upstream,
                "retention_days": a.retention_days,
                "checkpoint_entries": a.checkpoint_entries,
                "checkpoint_seconds": a.checkpoint_seconds,
            },
        }
        self.db, self.metrics = db, metrics
        self.replica = a.replica or f"{socket.gethostname()}-{port}"
        # Invented here only on the embedded database: replicas sharing one must share keys.
        create = settings.database.embedded
        master = load_master_key(a, create=create)
        check_master_key(db, master)
        if problem := durability_problem(db):
            log.error("%s", problem)
        self.signing_key, created = load_signing_key(a, master, create=create)
        self.public_key = public_key_hex(self.signing_key)
        if created or self.public_key not in a.trusted_public_keys:
            log.warning(
                "the audit signing key's public key is %s: `bastion audit verify` trusts only "
                "keys in audit.trusted_public_keys or given with --public-key, so add it there "
                "(and record it somewhere the database administrators cannot change)",
                self.public_key,
            )
        self.keys = TeamKeys(db, master, lambda: load_master_key(a, create=False))
        if a.anchor_dir is not None:
            # There from the first start on: a missing anchor at verify time means it was lost.
            Path(a.anchor_dir).mkdir(parents=True, exist_ok=True)
        self.redactor = Redactor(a.redact)
        self.refresh_seconds = settings.identity.key_refresh_seconds
        self.wal: AuditLog | None = None
        self.shipper: ShipperProcess | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._anchoring: asyncio.Task[None] | None = None
        self._anchored: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        a = self.settings
        head = await asyncio.to_thread(store.last_entry, self.db, self.replica)
        self.wal = await asyncio.to_thread(
            AuditLog,
            Path(a.wal_dir),
            self.replica,
            signing_key=self.signing_key,
            checkpoint_entries=a.checkpoint_entries,
            checkpoint_seconds=a.checkpoint_seconds,
            stored_head=head,
        )
        wal = self.wal
        leftovers = Shipper(self.db, Path(a.wal_dir), self.replica, lambda: wal.durable)
        await asyncio.to_thread(leftovers.ship_once)  # what an earlier run left behind
        interrupted = await asyncio.to_thread(store.open_requests, self.db, self.replica)
        await asyncio.gather(*(self._aborted(e) for e in interrupted))
        if interrupted:
            log.warning("marked %d interrupted request(s) as aborted", len(interrupted))
        await self.wal.append(
            {
                "kind": "start",
                "version": __version__,
                "pid": os.getpid(),
                "public_key": self.public_key,
                "recovered": len(interrupted),
                **self.policy,
            }
        )
        self.shipper = ShipperProcess(
            self.db.url.render_as_string(hide_password=False), Path(a.wal_dir), self.replica
        )
        self.shipper.position.set(*self.wal.durable)
        self.wal.on_durable = self.shipper.position.set
        shipped, errors = self.shipper.shipped, self.shipper.errors
        self.metrics.follow(self.metrics.audit_shipped, lambda: shipped.value)
        self.metrics.follow(self.metrics.audit_ship_errors, lambda: errors.value)
        await asyncio.to_thread(self.shipper.start)
        self._refresher = asyncio.create_task(self._refresh_keys())
        if a.anchor_dir is not None:
            self._anchoring = asyncio.create_task(self._anchor_loop())

    async def _aborted(self, request_entry: dict[str, Any]) -> None:
        meta = {k: request_entry.get(k) for k in ("request_id", "team", "user", "key_id", "model")}
        await self.wal.append(  # type: ignore[union-attr]
            {
                "kind": "completion",
                **meta,
                "outcome": "aborted",
                "aborted": True,
                "reason": "the gateway stopped before the response ended",
            }
        )

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await asyncio.to_thread(self.keys.refresh)
            except Exception:
                log.exception("refreshing audit data keys failed")
            if self.shipper is not None:  # starting a process takes a while: not on the loop
                await asyncio.to_thread(self.shipper.ensure_running)

    async def _anchor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.anchor_seconds)
            await asyncio.to_thread(self.anchor_once)

    def anchor_once(self) -> bool:
        """Signs the trusted heads now in the store into the anchor (if they moved). A failure
        is logged and counted, not fatal: entries stay durable, only the window grows."""
        a = self.settings
        try:
            trusted = {self.public_key, *a.trusted_public_keys}
            heads = anchor.trusted_heads(store.latest_checkpoints(self.db), trusted)
            if not heads or heads == self._anchored:
                return False
            m = anchor.manifest(self.signing_key, self.replica, heads)
            anchor.append(Path(a.anchor_dir), self.replica, m)  # type: ignore[arg-type]
        except Exception as exc:
            self.metrics.audit_failures.labels("anchor").inc()
            log.error("could not write the audit anchor %s: %s", a.anchor_dir, exc)
            return False
        self._anchored = heads
        return True

    async def stop(self) -> None:
        for task in (self._refresher, self._anchoring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.wal is not None:
            try:
                await self.wal.append({"kind": "stop", "pid": os.getpid()})
            except AuditLogError:
                log.exception("could not record the stop")
            await asyncio.to_thread(self.wal.close)  # signs a final checkpoint
        if self.shipper is not None:
            await asyncio.to_thread(self.shipper.stop)
        if self.settings.anchor_dir is not None and self.wal is not None:
            await asyncio.to_thread(self.anchor_once)  # the final checkpoint, anchored

    # -- the request path ------------------------------------------------------------------------
    async def request(
        self,
        rec: UsageRecord,
        principal: Principal,
        body: dict[str, Any],
        source: str | None,
        alone: bool = False,
    ) -> dict[str, Any]:
        """Records the request, durably, before it is forwarded (raises AuditUnavailable).
        Returns the body to forward: the redacted copy with `audit.redact_upstream`. `alone`:
        no other request is in flight, so the disk flush may run on the event loop."""
        entry = {
            "kind": "request",
            **_who(rec),
            "cost_center": principal.cost_center,
            "client_user": rec.client_user,
            "source": source,
            "endpoint": rec.endpoint,
            "model": rec.model,
            "stream": rec.stream,
        }
        if rec.adapter is not None:  # an adapter alias: the exact version that will answer
            entry["adapter"] = rec.adapter
        try:
            stored = await self._seal(entry, body)
            await self.wal.append(entry, inline=alone)  # type: ignore[union-attr]
        except Exception as exc:  # the log, the key store or the master key
            refusal = self.failed(rec, exc, "this request, so it was not forwarded")
            if refusal is not None:
                raise refusal from exc
            return body
        return stored if self.settings.redact_upstream else body

    def failed(self, rec: UsageRecord, exc: Exception, what: str) -> AuditUnavailable | None:
        """An entry could not be written: the refusal to answer with (`on_failure: closed`), or
        None where `open` lets the request through, loudly."""
        if self.settings.on_failure == "open":
            self.metrics.audit_failures.labels("forwarded").inc()
            log.error("AUDIT NOT RECORDED (audit.on_failure=open) %s: %s", rec.request_id, exc)
            return None
        self.metrics.audit_failures.labels("refused").inc()
        log.error("audit trail unavailable for %s: %s", rec.request_id, exc)
        return AuditUnavailable(f"The audit trail cannot record {what}. Try again shortly.")

    async def completion(
        self,
        rec: UsageRecord,
        *,
        kind: str = "completion",
        content: Any = None,
        aborted: bool = False,
        engine_model: str | None = None,
        error: str | None = None,
    ) -> None:
        """Records how the request ended; durable when this returns."""
        entry = {
            "kind": kind,
            **_who(rec),
            "endpoint": rec.endpoint,
            "model": rec.model,
            "served_model": rec.served_model,
            "deployment": rec.deployment,
            "engine_model": engine_model,
            "status": rec.status,
            "outcome": rec.outcome,
            "error_code": rec.error_code,
            "prompt_tokens": rec.prompt_tokens,
            "cached_tokens": rec.cached_tokens,
            "completion_tokens": rec.completion_tokens,
            "latency_ms": round(rec.latency_ms, 3),
            "aborted": aborted,
        }
        if rec.adapter is not None:
            entry["adapter"] = rec.adapter
        if kind == "rejected":
            entry["cost_center"] = rec.cost_center
        if rec.team is not None and (content is not None or error is not None):
            try:
                await self._seal(entry, {"response": content, "error": error})
            except (TypeError, orjson.JSONEncodeError) as exc:  # the entry itself still counts
                entry["content_unavailable"] = f"could not be serialised: {exc}"
        # Written before the answer completes, synced with the next flush (see wal.py).
        await self.wal.append(entry, durable=False)  # type: ignore[union-attr]

    def completion_later(self, rec: UsageRecord, **kw: Any) -> None:
        """`completion` without waiting (error paths, cancelled streams)."""
        task = asyncio.get_running_loop().create_task(self._guarded(rec, kw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, rec: UsageRecord, kw: dict[str, Any]) -> None:
        try:
            await self.completion(rec, **kw)
        except Exception as exc:
            self.metrics.audit_failures.labels("completion_lost").inc()
            log.error("audit completion entry for %s not recorded: %s", rec.request_id, exc)

    async def event(self, kind: str, actor: str, action: str, **fields: Any) -> None:
        """An admin change or a read of the trail, recorded durably (clear text: no prompts)."""
        await self.wal.append({"kind": kind, "actor": actor, "action": action, **fields})  # type: ignore[union-attr]

    async def _seal(self, entry: dict[str, Any], payload: Any) -> Any:
        """Seals the (redacted) payload into the entry; returns what was sealed. Large bodies
        are redacted and sealed in a worker thread, so the event loop never stalls on them."""
        key = await self.keys.get(str(entry["team"]))
        # Sealed in canonical form: the same bytes serve the seal and the commitment.
        raw = canonical(payload)
        if len(raw) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self._seal_with, key, entry, payload, raw)
        return self._seal_with(key, entry, payload, raw)

    def _seal_with(
        self, key: store.DataKey, entry: dict[str, Any], payload: Any, raw: bytes
    ) -> Any:
        counts: dict[str, int] = {}
        if self.settings.redact:
            payload, counts = self.redactor.json(payload)
            if counts:
                raw = canonical(payload)
        context = seal_context(entry)
        sealed = seal(key.key, raw, context)
        entry["content"] = base64.b64encode(sealed).decode()
        entry["content_sha256"] = content_digest(sealed)
        # Binds the plaintext an export shows to this hashed entry (docs/audit.md).
        entry["content_commit"], _salt = commitment(key.key, context, raw)
        entry["content_key"] = key.id
        if counts:
            entry["redactions"] = counts
        return payload


def _who(rec: UsageRecord) -> dict[str, Any]:
    return {"request_id": rec.request_id, "key_id": rec.key_id, "user": rec.user, "team": rec.team}
