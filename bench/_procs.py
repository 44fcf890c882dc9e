"""Child processes (each in its own process group) and signals that unwind into cleanup."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType


class Interrupted(Exception):
    """Raised from a signal handler so that ``finally`` blocks run."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` while the block runs."""
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, _on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader: pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Processes:
    """Every child this script starts, each in its own session, stopped in reverse order."""

    def __init__(self, pin: dict[str, set[int]] | None = None) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        # role ("wrk" or "server") -> CPUs its processes are pinned to
        self._pin = pin or {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr appended to ``log``; ``name`` picks the pin."""
        cpus = self._pin.get("wrk" if name == "wrk" else "server")
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=functools.partial(os.sched_setaffinity, 0, cpus) if cpus else None,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, then reap leftovers."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        # Children the leader left behind (e.g. gateway workers) share its process group.
        _signal_group(proc, signal.SIGKILL)
        self._procs = [p for p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)
