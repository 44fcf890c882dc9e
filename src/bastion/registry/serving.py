"""Each gateway replica makes its engines serve what `adapter_deployments` says.

Every `interval` seconds (and at once when a request finds its adapter loaded nowhere) a round
reads the table and, on each deployment of each base alias, loads the adapters deployed on it
and unloads registry adapters (names `NAME@VERSION`) that are no longer deployed: after
`bastion models deploy`, an undeploy, a retire, or an engine restart (which loses them), the
engines converge within one round. Adapters named otherwise (an operator's own
`--lora-modules`, `tune validate`'s temporary ones) are never touched.

Before an adapter is first loaded by this process, its files are checked against the registry
(digest cache, as at start): a tampered adapter is never loaded, and its alias answers 503
saying why.

Several replicas may load the same adapter on the same engine at once: loading is idempotent
by name (an engine that already has it answers 400 "already loaded", taken as done). A round
unloads an adapter only if the table, read again after the engine was listed, no longer deploys
it: a round that read the table just before a deploy must not undo another replica's load.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bastion.core.errors import UpstreamUnavailable
from bastion.engines import lora
from bastion.engines.client import EngineClient
from bastion.registry import adapters, records
from bastion.registry.adapters import AdapterDeployment
from bastion.registry.cache import DigestCache
from bastion.registry.digests import mismatches
from bastion.routing.balancer import Deployment, ModelRoute
from bastion.routing.poller import Poller

log = logging.getLogger("bastion.registry")

#: What this module loads, and so may unload: registry references.
REF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class AdapterServing(Poller):
    _task_name = "bastion-adapters"

    def __init__(
        self,
        db: Engine,
        client: EngineClient,
        routes: dict[str, ModelRoute],
        interval: float = 2.0,
    ):
        self._db = db
        self._client = client
        self._routes = routes
        self._interval = interval
        self._lock = asyncio.Lock()
        #: alias → the deployment it names, and those of them that can be served, as of the
        #: last round.
        self.known: dict[str, AdapterDeployment] = {}
        self.targets: dict[str, AdapterDeployment] = {}
        #: alias → why it cannot be served (files changed, base alias unknown), else absent.
        self.problems: dict[str, str] = {}
        #: adapter → the path its files were verified at, by this process, since it was last
        #: loaded anywhere (every load reads the files from disk again, so they are checked
        #: again before it).
        self._verified: dict[str, str] = {}
        #: Base aliases whose engines this process has checked: only aliases served from the
        #: registry can carry adapters, so no other engine is ever asked.
        self._bases = {
            a for a, r in routes.items() if all(d.settings.registry for d in r.deployments)
        }

    @property
    def _has_work(self) -> bool:
        return bool(self._bases)

    def resolve(self, name: str) -> AdapterDeployment | None:
        """The deployment behind an adapter alias this gateway serves (a config without its
        base alias does not: the alias is then unknown here)."""
        t = self.known.get(name)
        return t if t is not None and t.base_alias in self._bases else None

    async def poll(self) -> None:
        await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            rows = await asyncio.to_thread(adapters.active, self._db)
            for row in rows:  # about to be loaded somewhere: its files are checked again
                deps = (
                    self._routes[row.base_alias].deployments
                    if row.base_alias in self._bases
                    else []
                )
                if any(row.adapter not in d.adapters for d in deps):
                    self._verified.pop(row.adapter, None)
            targets, problems = {}, {}
            for row in rows:
                why = await self._problem(row)
                if why is None:
                    targets[row.alias] = row
                else:
                    problems[row.alias] = why
            for alias, why in problems.items():
                if self.problems.get(alias) != why:
                    log.error("adapter alias %s is not served: %s", alias, why)
            self.known = {row.alias: row for row in rows}
            self.targets, self.problems = targets, problems
            want: dict[str, dict[str, str]] = {}
            for t in targets.values():
                want.setdefault(t.base_alias, {})[t.adapter] = t.path
            await asyncio.gather(
                *(
                    self._sync(alias, dep, want.get(alias, {}))
                    for alias in self._bases
                    for dep in self._routes[alias].deployments
                    if lora.supported(dep.settings) and dep.healthy is not False
                )
            )

    async def _problem(self, row: AdapterDeployment) -> str | None:
        if row.base_alias not in self._bases:
            return f"its base alias '{row.base_alias}' is not served from the registry here"
        if row.state not in adapters.STAGE_STATES[row.stage]:
            return f"{row.adapter} is {row.state}"
        if self._verified.get(row.adapter) == row.path:
            return None
        rec = await asyncio.to_thread(records.get, self._db, *records.parse_ref(row.adapter))
        changed = await asyncio.to_thread(
            mismatches, Path(rec["path"]), rec["files"], None, None, DigestCache(self._db)
        )
        if changed:
            return f"{row.adapter} at {rec['path']} is not what was registered: {changed[0]}"
        self._verified[row.adapter] = row.path
        return None

    async def _sync(self, alias: str, dep: Deployment, want: dict[str, str]) -> None:
        try:
            have = await lora.loaded(self._client, dep.settings)
        except Exception as exc:
            log.warning("%s: cannot list its adapters: %s", dep.name, exc)
            return
        for name, path in want.items():
            if name in have:
                continue
            try:
                await lora.load(self._client, dep.settings, name, path)
                have[name] = path
                log.info("%s: loaded adapter %s from %s", dep.name, name, path)
            except Exception as exc:
                if "already been loaded" in str(exc):  # another replica won the race
                    have[name] = path
                else:
                    log.error("%s: could not load adapter %s: %s", dep.name, name, exc)
        stale = [n for n in have if REF_NAME.match(n) and n not in want]
        if stale:  # the table may have changed since this round read it: read it again
            stale = [n for n in stale if n not in await self._still_deployed(alias)]
        for name in stale:
            try:
                await lora.unload(self._client, dep.settings, name)
                del have[name]
                log.info("%s: unloaded adapter %s (no longer deployed)", dep.name, name)
            except Exception as exc:
                log.warning("%s: could not unload adapter %s: %s", dep.name, name, exc)
        dep.adapters = {n for n in have if n in want}

    async def _still_deployed(self, alias: str) -> set[str]:
        """The adapters deployed on `alias` now, servable as far as this replica knows. Another
        replica that loaded one read its deployment before loading it, so a read made after
        listing the engine sees every deployment the listing shows loaded: a round that began
        before a deploy does not unload what another replica has just loaded for it."""
        rows = await asyncio.to_thread(adapters.active, self._db)
        return {
            r.adapter
            for r in rows
            if r.base_alias == alias
            and r.state in adapters.STAGE_STATES[r.stage]
            and r.alias not in self.problems
        }

    async def prefer(
        self,
        target: AdapterDeployment,
        choices: Iterable[tuple[Deployment, str]],
        fresh: bool = False,
    ) -> list[tuple[Deployment, str]]:
        """The balancer's order, kept, among the replicas that have the adapter loaded. If none
        has (a restart, a load that failed), one round is run now, once. `fresh`: an engine
        has just denied having it, so what a round already under way lists is not trusted
        either: a round of this call's own (after it) decides."""
        choices = list(choices)
        ready = [] if fresh else self._loaded(target, choices)
        if not ready:
            await self.reconcile()
            ready = self._loaded(target, choices)
        if not ready:
            why = self.problems.get(target.alias) or "no replica of its base has it loaded"
            raise UpstreamUnavailable(
                f"The adapter '{target.adapter}' behind '{target.alias}' cannot be served "
                f"right now: {why}."
            )
        return ready

    @staticmethod
    def _loaded(
        target: AdapterDeployment, choices: list[tuple[Deployment, str]]
    ) -> list[tuple[Deployment, str]]:
        return [(d, r) for d, r in choices if target.adapter in d.adapters]

    def callable_by(self, principal: Any) -> list[AdapterDeployment]:
        """The adapter aliases this caller may name (as /v1/models lists them)."""
        return [
            t
            for t in self.known.values()
            if t.base_alias in self._bases
            and principal.may_use(t.alias)
            and (t.stage == "serve" or t.alias in (principal.models or ()))
        ]

    def status(self) -> dict[str, Any]:
        """For /readyz: each adapter alias, on how many replicas it is loaded, or why not."""
        out: dict[str, Any] = {}
        for alias, t in self.targets.items():
            deps = self._routes[t.base_alias].deployments
            n = sum(t.adapter in d.adapters for d in deps)
            out[alias] = {"adapter": t.adapter, "base": t.base_alias, "stage": t.stage,
                          "loaded_on": n, "replicas": len(deps)}  # fmt: skip
        for alias, why in self.problems.items():
            out[alias] = {"loaded_on": 0, "reason": why}
        return out
