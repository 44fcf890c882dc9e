"""Failed sign-ins counted across every gateway replica, in the limits backend (Redis).

The directory login (identity/ldap_login.py) throttles per replica in memory; with
`limits.backend: redis` the same attempts are also reserved here, in one atomic sliding-window
admission per attempt, so N replicas together still let at most `login_max_failures` guesses
per user name (and four times that per client address) reach the directory in a window. A
reservation is given back when the password proves right or the directory could not answer.

If Redis cannot be reached, sign-in is not refused for it: the per-replica throttle still holds
(logged at ERROR each time), since locking every user out while Redis is down would be worse.
"""

from __future__ import annotations

import logging
import math
import secrets

from bastion.core.errors import RateLimited
from bastion.limits.counters import Check, CounterBackend

log = logging.getLogger("bastion.limits")


class SharedLoginThrottle:
    def __init__(self, counters: CounterBackend, max_failures: int, window: float):
        self._counters = counters
        self._limits = {"user": max_failures, "source": 4 * max_failures}
        self._window = max(1, math.ceil(window))

    def _checks(self, keys: tuple[str, ...]) -> list[Check]:
        return [
            Check(
                f"sign-in {k.split(':', 1)[0]}",
                "rpm",
                f"login|{k}",
                "window",
                self._limits[k.split(":", 1)[0]],
                1,
                self._window,
                0.0,
            )
            for k in keys
        ]

    async def reserve(self, keys: tuple[str, ...]) -> str | None:
        """Counts the attempt as failed before it is made (429 if a key is at its limit); the
        reservation's id, or None if the backend could not be asked."""
        rid = "login-" + secrets.token_hex(8)
        try:
            verdict = await self._counters.admit(self._checks(keys), rid)
        except Exception as exc:
            log.error("sign-in throttle: limits backend unavailable, per replica only: %s", exc)
            return None
        if not verdict.ok:
            wait = max(1, math.ceil(verdict.retry_after or self._window))
            raise RateLimited(
                f"Too many failed sign-ins; try again in {wait} s.",
                code="login_throttled",
                headers={"retry-after": str(wait)},
            )
        return rid

    async def release(self, keys: tuple[str, ...], rid: str | None) -> None:
        if rid is None:
            return
        try:
            await self._counters.adjust([(c, -1, rid) for c in self._checks(keys)])
        except Exception as exc:
            log.error("sign-in throttle: could not give back a reservation: %s", exc)
