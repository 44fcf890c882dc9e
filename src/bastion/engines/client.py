"""The one seam to engines: every engine kind speaks OpenAI's HTTP API; quirks are ironed out here.

Transport errors become Bastion's error tree once, here: a refused connection is
`EngineConnectError` (safe to retry elsewhere: nothing was sent), a timeout `UpstreamTimeout`,
anything else `UpstreamError`. Engine error statuses are translated by `raise_for_engine_status`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bastion.core.errors import (
    EngineConnectError,
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


class EngineClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection cap of our own: admission control belongs to the policy layer.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "EngineClient.start() was not awaited"
        return self._session

    async def post(self, dep: DeploymentSettings, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Sends the request and returns once the engine's response headers are in."""
        headers = {"Content-Type": "application/json"}
        if dep.api_key:
            headers["Authorization"] = f"Bearer {dep.api_key}"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=dep.connect_timeout, sock_read=dep.read_timeout
        )
        try:
            async with asyncio.timeout(dep.first_byte_timeout):
                return await self.session.post(
                    dep.url + path, data=body, headers=headers, timeout=timeout
                )
        except aiohttp.ClientConnectorError as exc:
            raise EngineConnectError(f"engine at {dep.url} is unreachable: {exc.os_error}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the engine did not answer within {dep.first_byte_timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"engine connection failed: {type(exc).__name__}") from exc

    async def healthy(self, dep: DeploymentSettings, limit: float = 2.0) -> bool:
        headers = {"Authorization": f"Bearer {dep.api_key}"} if dep.api_key else {}
        try:
            async with self.session.get(
                dep.url + HEALTH_PATHS[dep.kind],
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


async def raise_for_engine_status(resp: aiohttp.ClientResponse) -> None:
    """Turns an engine error status into Bastion's error (the body is read and released)."""
    if resp.status < 400:
        return
    try:
        raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    finally:
        resp.release()
    message = _engine_message(raw) or f"engine answered HTTP {resp.status}"
    if 400 <= resp.status < 500:
        # The client's fault as the engine sees it (context too long, bad parameter, …).
        raise UpstreamRejected(message)
    if resp.status == 503:
        raise UpstreamUnavailable(f"engine unavailable: {message}")
    raise UpstreamError(f"engine error: {message}")


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
