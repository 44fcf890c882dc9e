"""Relaying a streamed answer: server-sent events forwarded as the engine produces them.

Each batch of events the engine client read is translated by the wire adapter (alias for
served name, the usage Bastion asked for hidden from clients that did not, another API's event
format) and sent on at once — no buffering, no re-chunking. A client disconnect drops the
engine connection at once, which makes the engine abort the request and free its slot. The
deployment lease is released when the stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bastion.core.errors import BastionError, UpstreamError
from bastion.engines.client import EngineResponse
from bastion.gateway.wire import StreamTranslator
from bastion.routing.balancer import Lease

log = logging.getLogger("bastion.gateway")
Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SSERelay:
    """An ASGI response that pumps one engine stream to the client."""

    def __init__(
        self,
        upstream: EngineResponse,
        lease: Lease,
        translator: StreamTranslator,
        headers: dict[str, str],
        on_end: Callable[[StreamTranslator, bool], None],
        before_done: Callable[[StreamTranslator], Awaitable[BastionError | None]] | None = None,
    ):
        self.upstream = upstream
        self.lease = lease
        self.translator = translator
        self.headers = [*SSE_HEADERS, *((k.encode(), v.encode()) for k, v in headers.items())]
        self.on_end = on_end
        #: Runs when the engine has finished, before the client gets the end of the stream (the
        #: audit trail's completion entry); an error it returns is sent instead.
        self.before_done = before_done

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        cancelled = False
        try:
            with self.lease:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                pump = asyncio.ensure_future(self._pump(send))
                watch = asyncio.ensure_future(wait_disconnect(receive))
                done, _ = await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
                if pump in done:
                    watch.cancel()
                    failure = pump.exception()
                    cancelled = failure is not None  # mostly: the client went away mid-send
                    if failure is not None and not isinstance(failure, OSError):
                        log.error("stream relay failed", exc_info=failure)
                else:
                    cancelled = True
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await pump
        except (asyncio.CancelledError, OSError):
            cancelled = True
            raise
        finally:
            self.upstream.done()  # back to the pool only if read to the end; else dropped
            self.on_end(self.translator, cancelled)

    async def _pump(self, send: Send) -> None:
        tr, state = self.translator, self.translator.state
        try:
            async for batch in self.upstream.events():
                out = [ev for event in batch if (ev := tr.event(event)) is not None]
                if out:
                    await send(
                        {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                    )
        except UpstreamError as exc:
            state.error = exc
        if state.error is None and state.done:
            failure = await self.before_done(tr) if self.before_done is not None else None
            if failure is None:
                await send({"type": "http.response.body", "body": tr.end(), "more_body": True})
            else:
                state.done, state.error = False, failure
        if state.error is not None:
            await send(
                {"type": "http.response.body", "body": tr.error(state.error), "more_body": True}
            )
        elif not state.done:
            state.error = UpstreamError("the engine ended the stream without [DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
