"""A misbehaving engine for failure injection (slow, broken, erroring), and one that answers
anything (chat, completions, embeddings; streams too) for fuzzing Bastion itself. Never the
only proof: the same paths are exercised against the real vLLM engine in test_sdk.py."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

from bastion.local.launcher import free_port


class StubEngine:
    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embed)
        app.router.add_get("/health", lambda _r: self._health())
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    async def _health(self) -> web.Response:
        return web.Response(status=200 if self.mode != "unhealthy" else 503)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "500":
            return web.json_response({"error": {"message": "CUDA out of memory"}}, status=500)
        if self.mode == "400":
            return web.json_response(
                {"error": {"message": "context too long", "type": "BadRequestError"}}, status=400
            )
        if self.mode in ("429", "503"):  # saturated / unavailable: another alias may serve
            return web.json_response({"error": {"message": "busy"}}, status=int(self.mode))
        if self.mode == "drop-stream":  # a first event, then the connection breaks
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(
                b'data: {"id":"x","model":"stub","choices":[{"index":0,"delta":'
                b'{"content":"a"}}]}\n\n'
            )
            await asyncio.sleep(0.2)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if self.mode == "late-first-event":  # headers at once, the first event 5 s later
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(5)
            return await self._stream(request, body, resp)
        if self.mode == "garbage":
            return web.Response(text="<html>proxy error</html>", status=200)
        if self.mode == "stall-stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(
                b'data: {"id":"x","model":"stub","choices":[{"index":0,"delta":'
                b'{"content":"a"}}]}\n\n'
            )
            await asyncio.sleep(3)
            return resp
        if body.get("stream"):
            return await self._stream(request, body)
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], resp: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        if resp is None:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
        chunk = {"id": "x", "model": body["model"], "choices": [{"index": 0, "delta": {}}]}
        chunk["choices"][0]["delta"] = {"content": "hi"}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        done = {"id": "x", "model": body["model"], "choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )

    def start(self) -> StubEngine:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def _shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
