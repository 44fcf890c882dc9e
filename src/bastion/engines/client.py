"""The one seam to engines: every engine kind speaks OpenAI's HTTP API; quirks are ironed out here.

`EngineClient.post` returns an `EngineResponse` whose headers are in and whose status is a
success; the body is then read once, whole (`read()`) or as server-sent events (`events()`).
aiohttp's objects and errors never leave this module: transport errors become Bastion's error
tree here, once — a refused connection is `EngineConnectError` (nothing was sent, so another
replica may be tried), silence past a timeout `UpstreamTimeout`, anything else `UpstreamError`;
an engine's error status becomes `UpstreamRejected` (4xx: the client's fault),
`UpstreamUnavailable` (503) or `UpstreamError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import yarl

from bastion.core.errors import (
    EngineConnectError,
    EngineOverloaded,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bastion.engines.settings import DeploymentSettings

HEALTH_PATHS = {
    "vllm": "/health",
    "sglang": "/health",
    "llamacpp": "/health",
    "openai": "/v1/models",
}


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


def read_usage(usage: Any) -> Usage | None:
    """Normalises a `usage` object; cached tokens come from prompt_tokens_details (absent = 0)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        cached_tokens=_int(cached),
        completion_tokens=_int(usage.get("completion_tokens")),
    )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _broken(exc: BaseException, during: str) -> UpstreamError:
    """A transport failure after the request was sent, in Bastion's terms."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"the engine stopped sending within its read timeout ({during})")
    return UpstreamError(f"the engine connection broke ({during}): {type(exc).__name__}")


class EngineResponse:
    """A successful engine answer whose headers are in. Its body is read once: `read()` or
    `events()`; then the connection goes back to the pool, or, if the answer was not read to
    the end, is dropped (`close()`), which makes the engine abort the request."""

    __slots__ = ("_first", "_resp", "_stream", "finished")

    def __init__(self, resp: aiohttp.ClientResponse):
        self._resp = resp
        #: The body was read to its end.
        self.finished = False
        #: A stream read ahead to its first events (`prime`): they come out of `events()` first.
        self._stream: AsyncIterator[list[bytes]] | None = None
        self._first: list[bytes] | None = None

    async def prime(self) -> None:
        """Reads a stream up to its first events without passing them on yet, so that the
        caller learns the engine has begun answering before anything reaches the client (the
        point after which a request must not move elsewhere). Drops the connection on failure
        or cancellation (a timeout)."""
        self._stream = self._read_events()
        try:
            self._first = await anext(self._stream, None)
        except BaseException:
            self.close()
            raise

    async def read(self) -> bytes:
        try:
            raw = await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.close()
            raise _broken(exc, "reading the answer") from exc
        except BaseException:  # cancelled: the engine must not go on for nobody
            self.close()
            raise
        self.finished = True
        self._resp.release()
        return raw

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The stream's server-sent events (without their blank-line terminator), a batch per
        network read, so that what arrived together is relayed together."""
        if self._stream is None:
            self._stream = self._read_events()
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for batch in self._stream:
            yield batch

    async def _read_events(self) -> AsyncIterator[list[bytes]]:
        buf = b""
        try:
            async for data in self._resp.content.iter_any():
                if b"\r" in data:
                    data = data.replace(b"\r\n", b"\n")
                buf += data
                batch = []
                while (i := buf.find(b"\n\n")) >= 0:
                    batch.append(buf[:i])
                    buf = buf[i + 2 :]
                if batch:
                    yield batch
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _broken(exc, "mid-stream") from exc
        if buf.strip():
            yield [buf.strip()]
        self.finished = True

    def close(self) -> None:
        """Drops the connection (the engine aborts the request); idempotent."""
        self._resp.close()

    def done(self) -> None:
        """Hands the connection back to the pool if the answer was read to its end, else drops
        it. Idempotent; call it once the caller is done with the response, whatever happened."""
        if self.finished:
            self._resp.release()
        else:
            self._resp.close()


class EngineClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._targets: dict[tuple[int, str], tuple[Any, ...]] = {}

    async def start(self) -> None:
        # No connection cap of our own: admission control belongs to the limits layer.
        # Idle connections are dropped before the engine drops them (vLLM's uvicorn closes them
        # after 5 s): reusing one the engine is closing fails the request mid-send (502).
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, keepalive_timeout=IDLE_KEEPALIVE_SECONDS
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            # Bodies are relayed as they come: never ask for a compression nobody decodes.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            # Engines set no cookies worth keeping; a jar would be read and written per request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _target(
        self, dep: DeploymentSettings, path: str
    ) -> tuple[yarl.URL, aiohttp.ClientTimeout, dict[str, str]]:
        """What every request to one engine path shares, built once: the parsed URL, the
        timeouts and the fixed headers (parsing a URL per request was a visible cost)."""
        key = (id(dep), path)  # (a settings model's own hash reads every field)
        target = self._targets.get(key)
        if target is None or target[0] is not dep:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=dep.connect_timeout, sock_read=dep.read_timeout
            )
            fixed = {"Content-Type": "application/json", **auth_headers(dep)}
            target = self._targets[key] = (dep, yarl.URL(dep.url + path), timeout, fixed)
        return target[1:]

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "EngineClient.start() was not awaited"
        return self._session

    async def post(
        self,
        dep: DeploymentSettings,
        path: str,
        body: bytes,
        extra_headers: dict[str, str] | None = None,
    ) -> EngineResponse:
        """Sends the request; returns once the engine's response headers are in and say OK."""
        url, timeout, fixed = self._target(dep, path)
        headers = {**extra_headers, **fixed} if extra_headers else fixed
        try:
            async with asyncio.timeout(dep.first_byte_timeout):
                resp = await self.session.post(url, data=body, headers=headers, timeout=timeout)
        except aiohttp.ClientConnectorError as exc:
            raise EngineConnectError(
                f"engine at {dep.display_url} is unreachable: {exc.os_error}"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Closed or reset before a status line: the engine went away (a crash, a restart,
            # a partition) while this request was being sent.
            raise EngineConnectError(
                f"engine at {dep.display_url} dropped the connection before answering "
                f"({type(exc).__name__})"
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the engine did not answer within {dep.first_byte_timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"engine connection failed: {type(exc).__name__}") from exc
        if resp.status >= 400:
            raise await _engine_error(resp)
        return EngineResponse(resp)

    async def healthy(self, dep: DeploymentSettings, limit: float = 2.0) -> bool:
        headers = auth_headers(dep)
        try:
            async with self.session.get(
                dep.url + HEALTH_PATHS[dep.kind],
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


def auth_headers(dep: DeploymentSettings) -> dict[str, str]:
    """The bearer key the engine expects, if it has one."""
    return {"Authorization": f"Bearer {dep.api_key}"} if dep.api_key else {}


#: Below every engine's own keep-alive (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default).
IDLE_KEEPALIVE_SECONDS = 4.0


async def _engine_error(
    resp: aiohttp.ClientResponse,
) -> UpstreamError | UpstreamRejected:
    """An engine error status in Bastion's terms (the body is read and the response released)."""
    try:
        raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    finally:
        resp.release()
    message = _engine_message(raw) or f"engine answered HTTP {resp.status}"
    if resp.status == 429:  # the engine is saturated: another alias may take the request
        return EngineOverloaded(f"engine overloaded: {message}")
    if 400 <= resp.status < 500:
        # The client's fault as the engine sees it (context too long, bad parameter, …).
        return UpstreamRejected(message)
    if resp.status == 503:
        return UpstreamUnavailable(f"engine unavailable: {message}")
    return UpstreamError(f"engine error: {message}")


def _engine_message(raw: bytes) -> str | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:500] or None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
        if isinstance(err, str):
            return err
    return None
