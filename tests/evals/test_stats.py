"""The statistics with known answers: paired bootstrap intervals and the pass@k estimator."""

from __future__ import annotations

import math

import pytest

from bastion.evals.stats import paired_bootstrap, pass_at_k, verdict


def test_a_constant_improvement_has_a_degenerate_interval_and_is_better() -> None:
    ci = paired_bootstrap([0.0] * 20, [1.0] * 20)
    assert (ci.delta, ci.low, ci.high, ci.n) == (1.0, 1.0, 1.0, 20)
    assert verdict(ci) == "better"
    assert verdict(ci, higher_is_better=False) == "worse"  # e.g. latency went up


def test_identical_runs_show_no_detectable_difference() -> None:
    xs = [0.1 * i for i in range(10)]
    ci = paired_bootstrap(xs, xs)
    assert (ci.low, ci.high) == (0.0, 0.0)
    assert verdict(ci) == "no detectable difference"


def test_interval_matches_the_normal_approximation_for_a_known_binomial() -> None:
    # 40 cases, B fixes exactly half: the mean difference is 0.5 with standard error
    # sqrt(0.25/40) = 0.079, so a 95% interval is about 0.5 +- 0.155.
    a = [0.0] * 40
    b = [1.0] * 20 + [0.0] * 20
    ci = paired_bootstrap(a, b, level=0.95)
    assert ci.delta == 0.5
    assert 0.32 <= ci.low <= 0.38 and 0.62 <= ci.high <= 0.68
    wider = paired_bootstrap(a, b, level=0.99)
    assert wider.low < ci.low and wider.high > ci.high


def test_pairing_removes_the_spread_between_cases() -> None:
    # Cases differ wildly in difficulty, but B is always 0.05 better: paired, that is certain.
    a = [0.05 * i for i in range(19)]
    b = [x + 0.05 for x in a]
    ci = paired_bootstrap(a, b)
    assert ci.low == pytest.approx(0.05) and ci.high == pytest.approx(0.05)


def test_the_bootstrap_is_seeded_and_repeatable() -> None:
    a = [math.sin(i) ** 2 for i in range(30)]
    b = [math.cos(i) ** 2 for i in range(30)]
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    assert paired_bootstrap(a, b, seed=1) != paired_bootstrap(a, b, seed=2)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no paired"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [1.0], level=95)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 2), (20, 5, 10), (7, 0, 3), (7, 7, 3), (200, 1, 100)]
)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_pass_rate() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
