"""At `bastion serve` start: every deployment that names a registry version
(`models.<alias>.deployments[].registry`) serves it only if the version is approved (and an
adapter's base too) and the files at its path match the recorded digests.

With `registry.verify: cached` (the default) a file is re-read only if its inode, size, mtime
or ctime changed since it was last verified on this host; `registry/cache.py` says why a cache
keyed on a size and an mtime alone would not do (`touch -d` restores an mtime) and why this one
does. With `full`, every file is hashed at every start: SHA-256 streams at 0.5 GB/s per core on
the 2-core CI machine (2 GB in 3.8 s; from the cache: 6 ms) and up to 2 GB/s on CPUs with SHA
extensions, on up to `registry.verify_workers` files at once. The log line says what was read
and how long it took.

`registry.enforce: refuse` stops the start with every problem named; `warn` starts, logs each
problem at ERROR, and marks the deployment so `/readyz` reports the model not ready, with why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bastion.config import ConfigError
from bastion.core.errors import BastionError
from bastion.engines.settings import DeploymentSettings
from bastion.registry import records
from bastion.registry.cache import DigestCache
from bastion.registry.digests import mismatches

log = logging.getLogger("bastion.registry")


class RegistryRefusal(ConfigError):
    """A deployment's model is not approved or not what was approved: the gateway won't start."""


def local_path(dep: DeploymentSettings, rec: dict[str, Any]) -> Path:
    """Where the gateway reads the weights this deployment's engine loads: `model_path`, else
    a `launch` directory, else where the version was registered from (also for `builtin:`
    models, whose generated directory is what one registers)."""
    if dep.model_path:
        return Path(dep.model_path).expanduser()
    if dep.launch and not dep.launch.startswith("builtin:"):
        return Path(dep.launch).expanduser()
    return Path(rec["path"])


def problem(
    db: Engine, dep: DeploymentSettings, workers: int, cache: DigestCache | None
) -> tuple[str | None, int]:
    """Why this deployment may not serve its registry version (None: it may), and the bytes
    hashed to find out."""
    assert dep.registry is not None
    try:
        rec = records.get(db, *records.parse_ref(dep.registry))
    except BastionError:
        return f"registry: {dep.registry} is not registered", 0
    if rec["state"] != "approved":
        return f"registry: {dep.registry} not approved (it is {rec['state']})", 0
    if rec["kind"] == "adapter":
        base = records.get(db, *records.parse_ref(rec["base"]))
        if base["state"] != "approved":
            return f"registry: base {rec['base']} of {dep.registry} not approved", 0
    path = local_path(dep, rec)
    found = mismatches(path, rec["files"], workers=workers, cache=cache)
    size = sum(int(f["size"]) for f in rec["files"])
    if found:
        return f"{found[0]} ({dep.registry} at {path})" + (
            f" and {len(found) - 1} more" if len(found) > 1 else ""
        ), size
    return None, size


def check_deployments(settings: Any, db: Engine) -> dict[tuple[str, int], str]:
    """(alias, deployment index) → why it may not serve; raises RegistryRefusal in refuse mode."""
    started, hashed, checked = time.monotonic(), 0, 0
    found: dict[tuple[str, int], str] = {}
    cache = DigestCache(db) if settings.registry.verify == "cached" else None
    for alias, model in settings.models.items():
        for i, dep in enumerate(model.deployments):
            if dep.registry is None:
                continue
            why, size = problem(db, dep, settings.registry.verify_workers, cache)
            hashed, checked = hashed + size, checked + 1
            if why is not None:
                found[alias, i] = why
    if checked:
        reused = cache.reused_bytes if cache is not None else 0
        log.info(
            "registry: verified %d deployment(s) in %.1f s: %.2f GB read and hashed, %.2f GB "
            "unchanged since verified (registry.verify: %s)",
            checked, time.monotonic() - started, (hashed - reused) / 1e9, reused / 1e9,
            settings.registry.verify,
        )  # fmt: skip
    if found and settings.registry.enforce == "refuse":
        lines = "\n".join(f"  model {a} deployment {i}: {why}" for (a, i), why in found.items())
        raise RegistryRefusal(
            f"refusing to start: {len(found)} deployment(s) may not serve their registry "
            f"version (registry.enforce: refuse):\n{lines}"
        )
    for (alias, i), why in found.items():
        log.error("REGISTRY CHECK FAILED, serving anyway (registry.enforce: warn): model %s "
                  "deployment %d: %s", alias, i, why)  # fmt: skip
    return found
