"""One rule for every change made through the control plane (admin API, self-service, CLI,
directory sweep): the `admin` entry is durable in the audit trail first, then the change is made.

- If the entry cannot be written, nothing changes and the caller gets 503 `audit_unavailable`.
- Except a revocation (`takes_access_away=True`): refusing it would leave a compromised key
  working because the trail is down, so it is made anyway, and logged at ERROR as unrecorded.
- If the change itself then fails (a duplicate name, an unknown key), a second entry
  (`<action>.failed`) says so: the trail never shows a change that did not happen without its
  failure beside it.

The actor is always the authenticated principal that asked (a user, a key id, "admin-key", or
"user@host (cli)").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

from bastion.core.errors import AuditUnavailable

log = logging.getLogger("bastion.audit")


class Trail(Protocol):
    async def event(self, kind: str, actor: str, action: str, **fields: Any) -> None: ...


#: The synchronous form (the CLI's own chain): record(actor, action, fields).
Record = Callable[[str, str, dict[str, Any]], None]


def _unrecorded(exc: Exception, actor: str, action: str, takes_access_away: bool) -> None:
    if takes_access_away:
        log.error("AUDIT NOT RECORDED: %s by %s made anyway (a revocation): %s", action, actor, exc)
        return
    log.error("admin change %s by %s refused: it cannot be recorded: %s", action, actor, exc)
    raise AuditUnavailable(
        "The audit trail cannot record this change, so it was not made. Try again shortly."
    ) from exc


def _failed(fields: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    return {**fields, "error": str(exc) or type(exc).__name__}


@asynccontextmanager
async def recorded_change(
    trail: Trail | None,
    actor: str,
    action: str,
    *,
    takes_access_away: bool = False,
    **fields: Any,
) -> AsyncIterator[None]:
    """`async with recorded_change(trail, actor, "team.create", …): <make the change>`.
    With the audit trail disabled (`audit.enabled: false`) there is nothing to record."""
    if trail is not None:
        try:
            await trail.event("admin", actor=actor, action=action, **fields)
        except Exception as exc:
            _unrecorded(exc, actor, action, takes_access_away)
    try:
        yield
    except Exception as exc:
        if trail is not None:
            try:
                await trail.event(
                    "admin", actor=actor, action=f"{action}.failed", **_failed(fields, exc)
                )
            except Exception:
                log.exception("could not record that %s by %s failed", action, actor)
        raise


@contextmanager
def recorded_change_sync(
    record: Record | None,
    actor: str,
    action: str,
    *,
    takes_access_away: bool = False,
    **fields: Any,
) -> Iterator[None]:
    """`recorded_change` for synchronous callers (the CLI), the same rule."""
    if record is not None:
        try:
            record(actor, action, fields)
        except Exception as exc:
            _unrecorded(exc, actor, action, takes_access_away)
    try:
        yield
    except Exception as exc:
        if record is not None:
            try:
                record(actor, f"{action}.failed", _failed(fields, exc))
            except Exception:
                log.exception("could not record that %s by %s failed", action, actor)
        raise
