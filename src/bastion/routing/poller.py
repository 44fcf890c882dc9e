"""A task that does one round of work every `interval` seconds while the gateway runs (health
checks, engine metrics): a failed round is logged and the next one still comes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("bastion.routing")


class Poller:
    #: Seconds between rounds; the task's name (logs, asyncio debugging).
    _interval: float = 5.0
    _task_name = "bastion-poller"
    _task: asyncio.Task[None] | None = None

    async def poll(self) -> None:
        raise NotImplementedError

    @property
    def _has_work(self) -> bool:
        return True

    async def start(self) -> None:
        if self._has_work:
            self._task = asyncio.create_task(self._loop(), name=self._task_name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:
                log.exception("%s: round failed", self._task_name)
            await asyncio.sleep(self._interval)
