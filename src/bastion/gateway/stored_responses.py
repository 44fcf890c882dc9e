"""Stored responses of the OpenAI Responses API: `store`, `previous_response_id`, retrieval.

An engine that stores responses keeps them in its own memory: lost on a restart, invisible to
the other replicas and never sealed. Bastion therefore tells engines to store nothing and keeps
responses itself, in its database, per team, sealed with the team's audit data key (a shredded
team's responses become unreadable with its audit contents), for `responses.retention_days`.

A stored document holds the whole input the engine saw (the previous responses' input and
output included, `instructions` aside, as OpenAI does not carry them over) and the response
object, so `previous_response_id` rebuilds the conversation from one row and the full
conversation is sent to whichever replica and engine serve the next turn.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from sqlalchemy import Engine, delete, select

from bastion.audit import store as audit_store
from bastion.audit.crypto import ContentUnavailable, KeyWrapper, open_sealed, seal
from bastion.audit.trail import TeamKeys
from bastion.core.errors import InvalidRequest, NotFound
from bastion.core.request import ParsedRequest
from bastion.gateway.settings import ResponsesSettings
from bastion.gateway.wire.base import Answer
from bastion.gateway.wire.responses import RESPONSES, input_items
from bastion.identity.principal import Principal
from bastion.metering.usage import UsageRecord
from bastion.store.schema import responses

log = logging.getLogger("bastion.gateway")


class Sealer(Protocol):
    """Seals a team's contents at rest (the audit trail's per-team data keys)."""

    async def seal(self, team: str, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        """Returns (the id of the key that sealed it, the sealed bytes)."""
        ...

    def open(self, key_id: str, team: str, sealed: bytes, context: bytes) -> bytes:
        """Blocking (reads the key store); ContentUnavailable if shredded or altered."""
        ...


class TeamSealer:
    def __init__(self, db: Engine, keys: TeamKeys):
        self.db, self.keys = db, keys

    async def seal(self, team: str, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        key = await self.keys.get(team)
        return key.id, seal(key.key, plaintext, context)

    def open(self, key_id: str, team: str, sealed: bytes, context: bytes) -> bytes:
        wrapper: KeyWrapper = self.keys.wrapper
        key = audit_store.data_keys(self.db, [key_id], wrapper).get(key_id)
        return open_sealed(key, sealed, context)


def _context(response_id: str, team: str) -> bytes:
    # Bound in: a sealed row copied to another id or team does not open.
    return f"response:{response_id}:{team}".encode()


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id}' not found.",
        param="previous_response_id",
        code="response_not_found",
    )


class ResponseStore:
    """The gateway's hook for `/v1/responses` (`prepare` before admission, `complete` and
    `keep` once answered) and the reads behind `GET`/`DELETE /v1/responses/{id}`."""

    def __init__(self, settings: ResponsesSettings, db: Engine, sealer: Sealer):
        self.settings, self.db, self.sealer = settings, db, sealer
        self._purger: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.store:
            self._purger = asyncio.create_task(self._purge_loop())

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None

    async def _purge_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.purge)
            except Exception:
                log.exception("deleting expired stored responses failed")
            await asyncio.sleep(self.settings.purge_interval_seconds)

    def purge(self, now: datetime | None = None) -> int:
        with self.db.begin() as conn:
            q = delete(responses).where(responses.c.expires_at < (now or datetime.now(UTC)))
            return conn.execute(q).rowcount or 0

    # -- the request path -----------------------------------------------------------------------
    async def prepare(self, principal: Principal, req: ParsedRequest) -> None:
        """Replaces `previous_response_id` by the conversation it names (the team's own)."""
        body = req.body
        previous = body.get("previous_response_id")
        if previous is None:
            return
        if not self.settings.store:
            raise InvalidRequest(
                "This gateway stores no responses (responses.store is off): send the whole "
                "conversation in 'input' instead of 'previous_response_id'.",
                param="previous_response_id",
                code="unsupported_parameter",
            )
        doc = await self.read(principal.team, previous)
        if doc is None:
            raise _not_found(previous)
        body["input"] = [*doc["input"], *doc["response"].get("output", []), *input_items(body)]
        req.messages = len(body["input"]) + (1 if body.get("instructions") else 0)

    def complete(self, req: ParsedRequest, answer: Answer) -> Answer:
        return RESPONSES.complete(req, answer)

    async def keep(self, rec: UsageRecord, req: ParsedRequest, response: Any) -> None:
        """Stores the answered response if the client asked (`store`, true by default)."""
        if not self.settings.store or req.body.get("store", True) is False:
            return
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        if response.get("status") not in ("completed", "incomplete") or rec.team is None:
            return
        rid, team = response["id"], rec.team
        doc = {"input": input_items(req.body), "response": response}
        key_id, sealed = await self.sealer.seal(team, orjson.dumps(doc), _context(rid, team))
        now = datetime.now(UTC)
        row = {
            "id": rid,
            "team": team,
            "key_id": rec.key_id,
            "request_id": rec.request_id,
            "model": rec.model or "",
            "previous_id": req.body.get("previous_response_id"),
            "content_key": key_id,
            "content": sealed,
            "created_at": now,
            "expires_at": now + timedelta(days=self.settings.retention_days),
        }
        await asyncio.to_thread(self._insert, row)

    def _insert(self, row: dict[str, Any]) -> None:
        with self.db.begin() as conn:
            conn.execute(responses.insert(), row)

    # -- reads ----------------------------------------------------------------------------------
    async def read(self, team: str, response_id: str) -> dict[str, Any] | None:
        """The stored document of a response of this team; None if unknown, another team's,
        expired or shredded (all look the same to the caller)."""
        return await asyncio.to_thread(self._read, team, response_id)

    def _read(self, team: str, response_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(
                select(responses).where(
                    responses.c.id == response_id,
                    responses.c.team == team,
                    responses.c.expires_at >= datetime.now(UTC),
                )
            ).first()
        if row is None:
            return None
        try:
            plain = self.sealer.open(row.content_key, team, row.content, _context(row.id, team))
        except ContentUnavailable:
            return None
        doc: dict[str, Any] = orjson.loads(plain)
        return doc

    async def get(self, team: str, response_id: str) -> dict[str, Any]:
        doc = await self.read(team, response_id)
        if doc is None:
            raise NotFound(f"Response with id '{response_id}' not found.", code="not_found")
        response: dict[str, Any] = doc["response"]
        return response

    async def input_items(self, team: str, response_id: str) -> list[Any]:
        doc = await self.read(team, response_id)
        if doc is None:
            raise NotFound(f"Response with id '{response_id}' not found.", code="not_found")
        return list(doc["input"])

    async def delete(self, team: str, response_id: str) -> None:
        def run() -> int:
            with self.db.begin() as conn:
                q = delete(responses).where(responses.c.id == response_id, responses.c.team == team)
                return conn.execute(q).rowcount or 0

        if not await asyncio.to_thread(run):
            raise NotFound(f"Response with id '{response_id}' not found.", code="not_found")
