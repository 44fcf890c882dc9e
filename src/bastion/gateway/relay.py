"""Relaying the engine's answer: whole JSON bodies, or SSE streams event by event.

A stream is forwarded as the engine produces it: each read from the engine is split into
complete SSE events, each event is adjusted (alias for served name, the usage chunk Bastion
asked for hidden from clients that did not) and sent on at once — no buffering, no re-chunking.
A client disconnect closes the engine connection at once, which makes the engine abort the
request and free its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from bastion.core.errors import BastionError, UpstreamError, UpstreamTimeout
from bastion.engines.client import Usage, read_usage

log = logging.getLogger("bastion.gateway")
Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Answer:
    """A non-streamed engine answer, as the client gets it."""

    __slots__ = ("body", "engine_model", "obj", "usage")

    def __init__(self, raw: bytes, alias: str):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("the engine returned a body that is not JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamError("the engine returned JSON that is not an object")
        self.engine_model = obj.get("model")
        if "model" in obj:
            obj["model"] = alias
        self.obj: dict[str, Any] = obj
        self.body = orjson.dumps(obj)
        self.usage = read_usage(obj.get("usage"))


class StreamState:
    """What the relay learned from the stream; read by the pipeline when recording usage."""

    __slots__ = ("chunks", "done", "engine_model", "error", "first_token_at", "output", "usage")

    def __init__(self, collect: bool = False) -> None:
        self.usage: Usage | None = None
        self.first_token_at: float | None = None
        self.chunks = 0
        self.done = False
        self.error: BastionError | None = None
        self.engine_model: str | None = None
        #: The answer so far, per choice (only when collecting for the audit trail).
        self.output: dict[int, dict[str, Any]] | None = {} if collect else None

    def collect(self, choices: list[Any]) -> None:
        out = self.output
        assert out is not None
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            acc = out.setdefault(ch.get("index", 0), {"parts": [], "tools": {}})
            delta = ch.get("delta")
            if isinstance(delta, dict):
                if isinstance(c := delta.get("content"), str):
                    acc["parts"].append(c)
                if isinstance(r := delta.get("role"), str):
                    acc["role"] = r
                for tc in delta.get("tool_calls") or ():
                    _merge_tool_call(acc["tools"], tc)
            elif isinstance(t := ch.get("text"), str):
                acc["parts"].append(t)
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]

    def assembled(self) -> list[dict[str, Any]]:
        """The streamed answer put back together: text, tool calls, finish reason per choice."""
        result = []
        for index, acc in sorted((self.output or {}).items(), key=_by_index):
            choice: dict[str, Any] = {
                "index": index,
                "text": "".join(acc["parts"]),
                "finish_reason": acc.get("finish_reason"),
            }
            if acc["tools"]:
                choice["tool_calls"] = [
                    {**tc, "function": {**tc["function"], "arguments": "".join(tc["args"])}}
                    for _i, tc in sorted(acc["tools"].items(), key=_by_index)
                ]
                for tc in choice["tool_calls"]:
                    del tc["args"]
            result.append(choice)
        return result


def _by_index(item: tuple[Any, Any]) -> tuple[int, Any]:
    """Engines send integer indexes; anything else sorts after them instead of failing."""
    index = item[0]
    return (0, index) if isinstance(index, int) else (1, str(index))


def _merge_tool_call(tools: dict[int, dict[str, Any]], tc: Any) -> None:
    if not isinstance(tc, dict):
        return
    acc = tools.setdefault(tc.get("index", 0), {"function": {}, "args": []})
    for k in ("id", "type"):
        if tc.get(k):
            acc[k] = tc[k]
    fn = tc.get("function")
    if isinstance(fn, dict):
        if fn.get("name"):
            acc["function"]["name"] = fn["name"]
        if isinstance(a := fn.get("arguments"), str):
            acc["args"].append(a)


class SSERelay:
    """An ASGI response that pumps one engine stream to the client."""

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        alias: str,
        client_wants_usage: bool,
        headers: dict[str, str],
        on_end: Callable[[StreamState, bool], None],
        before_done: Callable[[StreamState], Awaitable[BastionError | None]] | None = None,
    ):
        self.upstream = upstream
        self.alias = alias
        self.wants_usage = client_wants_usage
        self.headers = [*SSE_HEADERS, *((k.encode(), v.encode()) for k, v in headers.items())]
        self.on_end = on_end
        #: Runs when the engine has finished, before the client gets [DONE] (the audit trail's
        #: completion entry); an error it returns is sent instead of [DONE].
        self.before_done = before_done
        self.state = StreamState(collect=before_done is not None)

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        cancelled = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": self.headers,
                }
            )
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(_wait_disconnect(receive))
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
            if cancelled or not self.state.done:
                self.upstream.close()  # drops the connection: the engine aborts the request
            else:
                self.upstream.release()
            self.on_end(self.state, cancelled)

    async def _pump(self, send: Send) -> None:
        state = self.state
        buf = b""
        try:
            async for data in self.upstream.content.iter_any():
                if b"\r" in data:
                    data = data.replace(b"\r\n", b"\n")
                buf += data
                out = []
                while (i := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:i], buf[i + 2 :]
                    if (ev := self._event(event)) is not None:
                        out.append(ev)
                if out:
                    await send(
                        {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                    )
            if buf.strip() and (ev := self._event(buf.strip())) is not None:
                await send({"type": "http.response.body", "body": ev, "more_body": True})
        except (TimeoutError, aiohttp.ServerTimeoutError):
            state.error = UpstreamTimeout("the engine stopped sending within its read timeout")
        except aiohttp.ClientError as exc:
            state.error = UpstreamError(
                f"the engine connection broke mid-stream: {type(exc).__name__}"
            )
        if state.error is None and state.done:
            failure = await self.before_done(state) if self.before_done is not None else None
            if failure is None:
                await send({"type": "http.response.body", "body": DONE, "more_body": True})
            else:
                state.done, state.error = False, failure
        if state.error is not None:
            await send({"type": "http.response.body", "body": state.error.sse(), "more_body": True})
        elif not state.done:
            state.error = UpstreamError("the engine ended the stream without [DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # comments and other fields pass as they are
        payload = event[5:].lstrip()
        if payload == b"[DONE]":
            self.state.done = True
            return None  # sent once the answer is recorded (see `before_done`)
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(obj, dict):
            return event + b"\n\n"
        state = self.state
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            state.error = UpstreamError(f"engine error mid-stream: {msg}")
        choices = obj.get("choices")
        if choices:
            state.chunks += 1
            if state.first_token_at is None:
                state.first_token_at = time.perf_counter()
            if state.output is not None and isinstance(choices, list):
                state.collect(choices)
        if "usage" in obj:
            usage = obj["usage"]
            if usage is not None:
                state.usage = read_usage(usage)
            if not self.wants_usage:
                if usage is not None and not choices:
                    return None  # the usage-only chunk Bastion asked for on the client's behalf
                del obj["usage"]
        if "model" in obj:
            state.engine_model = obj["model"]
            obj["model"] = self.alias
        return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
