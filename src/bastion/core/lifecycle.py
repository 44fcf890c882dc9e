"""One lifecycle for every long-lived part of a gateway process: `start()` and `stop()`,
both awaited on the event loop and neither blocking it (disk and thread joins go to worker
threads). `running` starts them in dependency order and stops them in reverse, also when a
start fails half-way, so nothing is left running and nothing starts lazily on a request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

log = logging.getLogger("bastion")


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@asynccontextmanager
async def running(components: Sequence[Component]) -> AsyncIterator[None]:
    started: list[Component] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
        yield
    finally:
        for component in reversed(started):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)
