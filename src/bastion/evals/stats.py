"""The statistics of comparisons: a paired bootstrap of per-case differences, and pass@k.

Paired: both runs answered the same cases, so the comparison resamples *cases* (with
replacement) and recomputes the mean of the per-case differences B - A each time. Pairing
removes the case-to-case spread (easy and hard questions) from the interval, which is what
makes a 30-case suite able to detect anything at all. The interval is the percentile interval
of RESAMPLES resampled means, from a seeded generator: the same two runs always give the same
interval. Pure Python: suites are hundreds of cases, not millions (1,000 cases x 10,000
resamples takes about a second).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

RESAMPLES = 10_000
SEED = 20261130


@dataclass(frozen=True, slots=True)
class Interval:
    delta: float  # mean of B - A
    low: float
    high: float
    level: float
    n: int


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Percentile CI at `level` for mean(b - a) over paired observations a[i], b[i]."""
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    if not 0 < level < 1:
        raise ValueError("level is between 0 and 1 (e.g. 0.95)")
    n = len(a)
    if n == 0:
        raise ValueError("no paired observations")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    # Each resample draws n whole cases with replacement (their differences, so pairs stay
    # together); `choices` is the fastest uniform draw the standard library has.
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    alpha = (1 - level) / 2
    lo = means[max(0, math.floor(alpha * resamples))]
    hi = means[min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)]
    return Interval(mean(diffs), lo, hi, level, n)


def verdict(ci: Interval, higher_is_better: bool = True) -> str:
    """'better' / 'worse' for B against A when the interval excludes zero, else
    'no detectable difference' (which is not evidence of equality: a small suite says little)."""
    if ci.low > 0:
        return "better" if higher_is_better else "worse"
    if ci.high < 0:
        return "worse" if higher_is_better else "better"
    return "no detectable difference"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c passed (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): 1 - C(n-c, k) / C(n, k), the chance
    that at least one of k samples drawn without replacement from the n passes. Computed as a
    product, which stays exact in floating point where the binomials would overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
