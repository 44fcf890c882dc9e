"""A retry budget: how many requests may move to another replica after a failed attempt.

Without one, a fleet that is failing gets every request's retries on top of the requests
themselves, just when it can least take them. After Finagle's RetryBudget: retries are allowed
up to a share of the recent requests plus a small reserve per second, counted over a sliding
window in one-second buckets (bounded memory, O(1) per request).
"""

from __future__ import annotations

import math
import time
from collections import deque


class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_per_second: float = 3.0, window: float = 10.0):
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._seconds = max(1, math.ceil(window))
        #: (second, requests, retries), oldest first.
        self._buckets: deque[list[int]] = deque()

    def _current(self) -> list[int]:
        now = int(time.monotonic())
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - self._seconds:
            buckets.popleft()
        if not buckets or buckets[-1][0] != now:
            buckets.append([now, 0, 0])
        return buckets[-1]

    def request(self) -> None:
        self._current()[1] += 1

    def try_retry(self) -> bool:
        """Takes one retry if the budget allows it."""
        bucket = self._current()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries + 1 > self.min_per_second * self.window + self.ratio * requests:
            return False
        bucket[2] += 1
        return True
