"""A paced SSE engine stub for `bench/streaming.py`: chat-completion chunks as vLLM streams them,
one every `--interval-ms`, each carrying the moment it was written.

Every content delta is ``t=<CLOCK_MONOTONIC seconds>``: the client (on the same host, same
clock) subtracts it from the moment the chunk reached it, which is the relay latency of that
chunk, whatever sat in between. Standard library only; run as
``python3 -m bench.stream_stub --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def _event(delta: dict[str, str] | None, finish: str | None = None, usage: bool = False) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    doc = {
        "id": "chatcmpl-stream-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "stub-model",
        "choices": choices,
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
        if usage
        else None,
    }
    data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return lines[0].split(" ")[1] if lines and " " in lines[0] else None


async def serve(port: int, chunks: int, interval: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                path = await _read_request(reader)
                if path in ("/health", "/v1/models"):
                    writer.write(OK)
                    continue
                if path != "/v1/chat/completions":
                    writer.write(NOT_FOUND)
                    continue
                writer.write(HEAD + _event({"role": "assistant", "content": ""}))
                for i in range(chunks):
                    if interval:
                        await asyncio.sleep(interval)
                    last = i == chunks - 1
                    stamp = {"content": f"t={time.monotonic():.6f} "}
                    writer.write(_event(stamp, "stop" if last else None))
                    if interval:
                        await writer.drain()
                writer.write(_event(None, usage=True))
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(prog="python3 -m bench.stream_stub")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    p.add_argument("--interval-ms", type=float, default=10.0, help="0: all chunks at once")
    args = p.parse_args()
    asyncio.run(serve(args.port, args.chunks, args.interval_ms / 1000))


if __name__ == "__main__":
    main()
