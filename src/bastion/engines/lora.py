"""LoRA adapters on a running engine: which are loaded, load one, unload one.

vLLM serves these (`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`):
`GET /v1/models` lists each loaded adapter as a model with a `parent` (its base);
`POST /v1/load_lora_adapter {lora_name, lora_path}` reads the adapter from a path on the
engine's host; `POST /v1/unload_lora_adapter {lora_name}`. Other engine kinds have no runtime
LoRA API here: an adapter alias is not served on them.
"""

from __future__ import annotations

import aiohttp
import orjson

from bastion.engines.client import EngineClient, auth_headers
from bastion.engines.settings import DeploymentSettings

#: Loading reads the weights from disk (and on a GPU copies them over): slower than a request.
LOAD_TIMEOUT = 120.0


class LoraError(Exception):
    """The engine did not do what was asked; the message is safe to log (no credentials)."""


def supported(dep: DeploymentSettings) -> bool:
    return dep.kind == "vllm"


async def loaded(client: EngineClient, dep: DeploymentSettings) -> dict[str, str]:
    """The adapters the engine serves now: name → the path it loaded it from."""
    async with client.session.get(
        dep.url + "/v1/models", headers=auth_headers(dep), timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        if resp.status != 200:
            raise LoraError(f"{dep.display_url}/v1/models answered {resp.status}")
        body = orjson.loads(await resp.read())
    return {
        m["id"]: m.get("root") or ""
        for m in body.get("data", [])
        if isinstance(m, dict) and m.get("parent") and m.get("id") != dep.served_name
    }


async def load(client: EngineClient, dep: DeploymentSettings, name: str, path: str) -> None:
    await _post(client, dep, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


async def unload(client: EngineClient, dep: DeploymentSettings, name: str) -> None:
    await _post(client, dep, "/v1/unload_lora_adapter", {"lora_name": name})


async def _post(
    client: EngineClient, dep: DeploymentSettings, path: str, body: dict[str, str]
) -> None:
    async with client.session.post(
        dep.url + path,
        data=orjson.dumps(body),
        headers={**auth_headers(dep), "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT),
    ) as resp:
        if resp.status == 200:
            return
        text = (await resp.read()).decode("utf-8", "replace")[:300]
        if resp.status == 404 and "/v1/" in path and "Not Found" in text:
            text = "the engine has no runtime LoRA API (start vLLM with --enable-lora and " \
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"  # fmt: skip
        raise LoraError(f"{dep.display_url}{path} answered {resp.status}: {text}")
