"""Shared fixtures. Every real service starts once per test session:

- two real vLLM CPU engines: the locally generated tiny chat model and all-MiniLM-L6-v2
  (embeddings), from the engine venv that `scripts/install-engine.sh` builds;
- the machine's PostgreSQL (127.0.0.1:5432), in a throw-away database;
- Bastion itself as a real `bastion serve` process, called with the official `openai` SDK.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.local.launcher import (
    EngineSpec,
    VllmProcess,
    embedding_model_dir,
    engine_installed,
    ensure_tiny_model,
    free_port,
)

#: Session fixtures kept out of this file (each file stays under 500 lines).
pytest_plugins = ["tests.lora_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-" + secrets.token_hex(16)
#: One audit master key for every gateway of the session, as replicas share it in production.
AUDIT_MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
#: Shared by every test gateway, as by a production fleet's replicas: on PostgreSQL a session
#: key is never invented (docs/deploy.md).
SESSION_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
#: ... and one checkpoint-signing key, whose public key their configs trust.
AUDIT_SIGNING_SEED = secrets.token_bytes(32)
AUDIT_PUBLIC_KEY = (
    Ed25519PrivateKey.from_private_bytes(AUDIT_SIGNING_SEED)
    .public_key()
    .public_bytes(Encoding.Raw, PublicFormat.Raw)
    .hex()
)
PG_ADMIN_URL = os.environ.get(
    "BASTION_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TINY = "tiny-chat"
#: Claude Code's system prompt and tools alone are ~20k tokens (../shared/CLIENTS.md).
TINY_CONTEXT = 65536
#: `tool_choice: "auto"` needs a tool-call parser; the tiny model's ChatML fits hermes.
TOOL_CALLING = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
EMBED = "all-minilm-l6-v2"
RERANK = "tiny-rerank"


# -- engines --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-logs")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not engine_installed():
        subprocess.run(["bash", str(ROOT / "scripts/install-engine.sh")], check=True)
    return ensure_tiny_model()


#: The session chat engine loads LoRA adapters at run time, so that adapter validation, adapter
#: serving through the gateway and eval gates share it instead of each starting an engine.
LORA_ARGS = ("--enable-lora", "--max-lora-rank", "8", "--max-loras", "4")
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


@pytest.fixture(scope="session")
def engines_booting(tiny_model: Path, engine_logs: Path) -> Iterator[dict[str, VllmProcess]]:
    """The tiny chat engine and the embedding engine, started but perhaps not ready yet: a
    module can ask for this first to let them boot while its own slow set-up runs."""
    procs = {
        "chat": VllmProcess(
            EngineSpec(
                tiny_model,
                TINY,
                free_port(),
                gpu_memory_utilization=0.05,
                max_model_len=TINY_CONTEXT,
                extra_args=TOOL_CALLING + LORA_ARGS,
            ),
            log_path=engine_logs / "chat.log",
            env=LORA_ENV,
        ),
        "embed": VllmProcess(
            EngineSpec(embedding_model_dir(), EMBED, free_port(), gpu_memory_utilization=0.05),
            log_path=engine_logs / "embed.log",
        ),
    }
    try:
        for p in procs.values():
            p.start()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def engines(engines_booting: dict[str, VllmProcess]) -> dict[str, VllmProcess]:
    """The same engines, ready (they boot in parallel)."""
    for p in engines_booting.values():
        p.wait_ready(timeout=420)
    return engines_booting


@pytest.fixture(scope="session")
def chat_engine(engines: dict[str, VllmProcess]) -> VllmProcess:
    return engines["chat"]


@pytest.fixture(scope="session")
def embed_engine(engines: dict[str, VllmProcess]) -> VllmProcess:
    return engines["embed"]


@pytest.fixture(scope="module")
def rerank_engine(engine_logs: Path) -> Iterator[VllmProcess]:
    """A tiny cross-encoder (src/bastion/local/tiny_reranker.py) serving /v1/rerank and
    /v1/score; started only by the module that asks for it and stopped after it, so the rest
    of the suite does not pay for it (an idle vLLM CPU engine keeps threads spinning)."""
    from bastion.local.tiny_reranker import ensure_tiny_reranker

    if not engine_installed():
        subprocess.run(["bash", str(ROOT / "scripts/install-engine.sh")], check=True)
    spec = EngineSpec(ensure_tiny_reranker(), RERANK, free_port(), gpu_memory_utilization=0.05)
    proc = VllmProcess(spec, log_path=engine_logs / "rerank.log")
    try:
        proc.start()
        proc.wait_ready(timeout=420)
        yield proc
    finally:
        proc.stop()


# -- databases ------------------------------------------------------------------------------------
@contextlib.contextmanager
def pg_database(migrate: bool = True) -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards. Migrated, as
    `bastion db upgrade` leaves it before a deployment (PostgreSQL is not migrated at start),
    unless `migrate` is False."""
    from bastion.store.db import make_engine, upgrade

    name = "bastion_test_" + secrets.token_hex(4)
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        if migrate:
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


# -- the gateway ----------------------------------------------------------------------------------
def base_config(db_url: str, models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "database": {"url": db_url, "usage_flush_seconds": 0.05},
        "identity": {"key_refresh_seconds": 0.5},
        "cost_centers": {"cc-1": {"name": "Retail"}, "cc-2": {"name": "Risk"}},
        "teams": {"alpha": {"cost_center": "cc-1"}, "beta": {"cost_center": "cc-2"}},
        "models": models,
        "prices": {},
    }
    cfg.update(extra)
    return cfg


def audit_config(directory: Path, **extra: Any) -> dict[str, Any]:
    """Audit settings with every file under `directory` (in-process apps run in the repo).
    The signing key is made here, so its public key is configured as trusted, as in a real
    deployment (verify trusts nothing read from the data directory)."""
    from bastion.audit.chain import public_key_hex
    from bastion.audit.keys import load_master_key, load_signing_key
    from bastion.audit.settings import AuditSettings

    cfg = {
        "wal_dir": str(directory / "audit"),
        "signing_key": str(directory / "audit-signing.pem"),
        "master_key_file": str(directory / "audit-master.key"),
        "anchor_dir": str(directory / "audit-anchor"),
        **extra,
    }
    a = AuditSettings(**cfg)
    key, _ = load_signing_key(a, load_master_key(a))
    cfg.setdefault("trusted_public_keys", [public_key_hex(key)])
    return cfg


class Gateway:
    """A real `bastion serve` process."""

    def __init__(self, config: dict[str, Any], workdir: Path):
        audit = config.setdefault("audit", {})
        audit.setdefault("trusted_public_keys", [AUDIT_PUBLIC_KEY])
        self.config = config
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / f"bastion-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.serve_args: list[str] = []  # more `bastion serve` flags (`--workers 2`)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BASTION_ADMIN_KEY": ADMIN_KEY,
            "BASTION_AUDIT_MASTER_KEY": AUDIT_MASTER_KEY,
            "BASTION_SESSION_KEY": SESSION_KEY,
            "BASTION_AUDIT_SIGNING_KEY": base64.b64encode(AUDIT_SIGNING_SEED).decode(),
            "BASTION_LOG_LEVEL": "WARNING",
        }

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            env=self.env,
            check=check,
            cwd=self.workdir,
        )

    def create_key(self, team: str = "alpha", *extra: str) -> str:
        out = self.cli("keys", "create", "--team", team, *extra).stdout.strip().splitlines()
        assert out and out[-1].startswith("bst-"), out
        return out[-1]

    def create_auditor_key(self, team: str = "alpha", user: str | None = None) -> str:
        """Set-up only: an auditor key written straight to the database. Bastion itself makes
        auditors only from the IdP's groups or with a second administrator's approval."""
        from bastion.identity.keys import create_key
        from bastion.store.db import make_engine

        engine = make_engine(self.config["database"]["url"])
        try:
            known = set(self.config.get("models", {}))
            return create_key(engine, team=team, user=user, known_models=known, role="auditor")[1]
        finally:
            engine.dispose()

    def start(self, timeout: float = 30) -> Gateway:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bastion.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *self.serve_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("gateway did not start in time")

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would: the gateway drains and flushes usage."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError("gateway never became ready")


@contextlib.contextmanager
def _gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(config: dict[str, Any], start: bool = True) -> Gateway:
        gw = Gateway(config, tmp_path_factory.mktemp("gw"))
        started.append(gw)
        return gw.start() if start else gw

    try:
        yield make
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture(scope="module")
def make_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gateway]]:
    """Gateways stopped once the module that made them is done: kept for the whole session,
    dozens of idle gateways polling their engines slowed every later test."""
    with _gateways(tmp_path_factory) as make:
        yield make


@pytest.fixture(scope="session")
def _session_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gateway]]:
    with _gateways(tmp_path_factory) as make:
        yield make


def engine_models(chat: VllmProcess, embed: VllmProcess) -> dict[str, Any]:
    return {
        "tiny": {"deployments": [{"url": chat.url, "served_name": TINY}]},
        "minilm": {"kind": "embedding", "deployments": [{"url": embed.url, "served_name": EMBED}]},
    }


@pytest.fixture(scope="session")
def gateway(
    _session_gateways: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    """The shared gateway in front of the real engines, on SQLite."""
    db = tmp_path_factory.mktemp("db") / "bastion.db"
    cfg = base_config(
        f"sqlite:///{db}",
        engine_models(chat_engine, embed_engine),
        prices={"tiny": {"prompt": 1.0, "cached_prompt": 0.5, "completion": 2.0}},
    )
    gw = _session_gateways(cfg)
    gw.wait_ready()
    return gw


@pytest.fixture(scope="session")
def api_key(gateway: Gateway) -> str:
    return gateway.create_key("alpha", "--user", "alice")


@pytest.fixture
def client(gateway: Gateway, api_key: str):  # type: ignore[no-untyped-def]
    import openai

    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=60
    ) as c:
        yield c


def _poll(
    db_url: str, table: sa.Table, until: Callable[[list[Any]], bool], timeout: float, **where: Any
) -> list[Any]:
    """Rows of `table` matching `where`, read again until `until` accepts them (or time runs
    out): usage and audit rows reach the store from writer processes, a moment later."""
    engine = sa.create_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            q = sa.select(table)
            for k, v in where.items():
                q = q.where(table.c[k] == v)
            with engine.connect() as conn:
                rows = conn.execute(q).all()
            if until(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        engine.dispose()


def usage_rows(db_url: str, timeout: float = 5.0, **where: Any) -> list[Any]:
    """Usage records matching `where`, waiting briefly for the batch writer."""
    from bastion.store.schema import usage

    return _poll(db_url, usage, bool, timeout, **where)


def audit_docs(
    db_url: str,
    until: Callable[[list[dict[str, Any]]], bool] = bool,
    timeout: float = 15.0,
    **where: Any,
) -> list[dict[str, Any]]:
    """Audit entries matching `where`, waiting until `until` accepts them: an entry is durable
    in the trail's log first and reaches the database when the shipper next runs."""
    import orjson

    from bastion.store.schema import audit_entries

    def docs(rows: list[Any]) -> list[dict[str, Any]]:
        return [orjson.loads(r.doc) for r in rows]

    return docs(_poll(db_url, audit_entries, lambda rows: until(docs(rows)), timeout, **where))


# -- Redis ----------------------------------------------------------------------------------------
REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379/0")


class RedisServer:
    """A private redis-server on a free port, for tests that stop and start Redis."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


# -- identity providers ---------------------------------------------------------------------------
#: The OIDC provider's users: one client each (client credentials), with the claims it carries.
OIDC_USERS: dict[str, dict[str, Any]] = {
    "alice-cli": {
        "preferred_username": "alice",
        "email": "alice@bank.test",
        "groups": ["risk-analysts", "gpu-users"],
    },
    "bob-cli": {"preferred_username": "bob", "groups": ["trading"]},
    "carol-cli": {"preferred_username": "carol", "groups": ["bastion-auditors"]},
    "frank-cli": {"preferred_username": "frank", "groups": ["bastion-admins"]},
    "gina-cli": {"preferred_username": "gina", "groups": ["bastion-admins"]},
    # The same user before and after moving out of a mapped group (tokens issued later).
    "erin-cli": {"preferred_username": "erin", "groups": ["risk-analysts"]},
    "erin-moved-cli": {"preferred_username": "erin", "groups": ["trading"]},
}


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real OIDC provider (oidc-provider under Node) on loopback, for the whole session."""
    from tests.identity.oidc_provider import OidcProvider

    with OidcProvider(OIDC_USERS, tmp_path_factory.mktemp("oidc") / "provider.log") as op:
        yield op


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real OpenLDAP slapd (TLS, users, nested groups) on loopback, for the whole session."""
    from tests.identity.slapd import Slapd

    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
