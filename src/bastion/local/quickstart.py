"""`bastion up`: start the local engines a config marks `launch:`, then the gateway.

This is the one-machine quickstart (README's first command): the engines run as child
processes and stop with the gateway. Production runs engines under their own supervisor.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from bastion.config import Settings
from bastion.engines.settings import DeploymentSettings
from bastion.local.launcher import (
    EngineSpec,
    VllmProcess,
    embedding_model_dir,
    ensure_tiny_model,
)

BUILTIN = {"builtin:tiny-chat", "builtin:all-minilm-l6-v2"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class QuickstartError(RuntimeError):
    pass


def resolve_model(launch: str) -> Path:
    if launch == "builtin:tiny-chat":
        return ensure_tiny_model()
    if launch == "builtin:all-minilm-l6-v2":
        return embedding_model_dir()
    path = Path(launch).expanduser()
    if not path.is_dir():
        raise QuickstartError(
            f"launch: {launch!r} is neither a model directory nor one of {sorted(BUILTIN)}"
        )
    return path


def engine_spec(dep: DeploymentSettings, embedding: bool) -> EngineSpec:
    assert dep.launch is not None
    parts = urlsplit(dep.url)
    if parts.hostname not in LOOPBACK or parts.port is None:
        raise QuickstartError(
            f"{dep.display_url}: `bastion up` launches engines on a loopback URL with an "
            "explicit port only"
        )
    tiny = dep.launch == "builtin:tiny-chat"
    return EngineSpec(
        model=resolve_model(dep.launch),
        served_name=dep.served_name,
        port=parts.port,
        gpu_memory_utilization=0.1 if embedding else 0.15,
        # The built-in tiny model takes coding assistants' long prompts and their tools.
        max_model_len=None if embedding else 65536 if tiny else 2048,
        extra_args=("--enable-auto-tool-choice", "--tool-call-parser", "hermes") if tiny else (),
    )


def quickstart_key(settings: Settings) -> str | None:
    """A key for trying things out, kept in var/quickstart-key (mode 0600) between runs."""
    from bastion.core.changes import recorded_change_sync
    from bastion.identity.keys import hash_key, list_keys, new_key
    from bastion.identity.teams import open_store

    if not settings.teams:
        return None
    db = open_store(settings)
    path = Path("var/quickstart-key")
    now = datetime.now(UTC)
    if path.is_file():
        token = path.read_text().strip()
        if any(k.key_hash == hash_key(token) and k.status(now) == "active" for k in list_keys(db)):
            return token
    team = next(iter(settings.teams))
    made = new_key(
        db, team=team, name="quickstart", known_models={*settings.models, *settings.routers}
    )
    from bastion.audit.offline import cli_actor, cli_recorder

    record = cli_recorder(settings, db)
    with recorded_change_sync(
        record, cli_actor(), "key.create", team=team, after=made.record.public()
    ):
        made.save(db)
    token = made.token
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_quickstart(settings: Settings) -> int:
    import uvicorn

    from bastion.app import build_app

    engines: list[VllmProcess] = []
    Path("var").mkdir(exist_ok=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into SystemExit lets
    # the `finally` below stop the engines instead of leaving them orphaned.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for alias, model in settings.models.items():
            for dep in model.deployments:
                if dep.launch is None:
                    continue
                spec = engine_spec(dep, model.kind == "embedding")
                proc = VllmProcess(spec, log_path=Path(f"var/engine-{spec.port}.log"))
                sys.stderr.write(
                    f"starting engine for {alias} on {dep.display_url} "
                    f"(log: var/engine-{spec.port}.log)\n"
                )
                proc.start()
                engines.append(proc)
        for proc in engines:
            proc.wait_ready()
        token = quickstart_key(settings)
        host, port = settings.server.host, settings.server.port
        url = settings.server.public_url or f"http://{host}:{port}"
        sys.stderr.write(
            f"\nBastion is serving {', '.join(settings.models)} at {url}/v1\n"
            + (
                f"Try it:\n  export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY={token}\n"
                f'  curl $OPENAI_BASE_URL/models -H "Authorization: Bearer $OPENAI_API_KEY"\n'
                if token
                else ""
            )
            + "Stop with Ctrl-C.\n\n"
        )
        uvicorn.run(
            build_app(settings),
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    except QuickstartError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    finally:
        for proc in engines:
            proc.stop()
    return 0
