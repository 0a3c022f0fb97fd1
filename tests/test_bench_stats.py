"""bench.stats against numpy and against synthetic data whose true speedup is known."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import (
    bootstrap_ci,
    geometric_mean,
    paired_speedup,
    percentile,
    round_ratios,
    summarize,
)

QS = [0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 1000])
def test_percentile_matches_numpy(n: int) -> None:
    x = np.random.default_rng(n).lognormal(0.0, 0.5, size=n)
    for q in QS:
        assert percentile(x, q) == pytest.approx(np.percentile(x, q), rel=1e-12, abs=1e-15)


def test_percentile_known_values() -> None:
    x = [5.0, 1.0, 4.0, 2.0, 3.0]  # sorted: 1 2 3 4 5
    assert percentile(x, 50) == 3.0
    assert percentile(x, 25) == 2.0
    assert percentile(x, 90) == pytest.approx(4.6)  # h = 3.6 -> 4 + 0.6 * (5 - 4)
    assert percentile([1.0, 1.0, 2.0, 10.0], 99) == pytest.approx(2.0 + 0.97 * 8.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_percentile_rejects_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        percentile(bad, 50)


def test_percentile_rejects_bad_q() -> None:
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_summarize_matches_numpy() -> None:
    x = np.random.default_rng(3).gamma(2.0, 1.5, size=537)
    s = summarize(x)
    assert s.n == 537
    assert s.mean == pytest.approx(np.mean(x))
    assert s.std == pytest.approx(np.std(x, ddof=1))
    assert (s.min, s.max) == (np.min(x), np.max(x))
    assert (s.p50, s.p90, s.p99) == pytest.approx(tuple(np.percentile(x, [50, 90, 99])))
    assert summarize([2.5]).std == 0.0


def test_geometric_mean_is_symmetric_in_ratios() -> None:
    assert geometric_mean(np.array([2.0, 0.5])) == pytest.approx(1.0)
    assert geometric_mean(np.array([[1.0, 4.0], [9.0, 1.0]]), axis=-1) == pytest.approx([2.0, 3.0])


def test_round_ratios_are_ratios_of_medians() -> None:
    base = [[4.0, 5.0, 100.0], [6.0, 6.0, 6.0]]  # medians 5, 6
    slim = [[1.0, 2.0, 3.0], [3.0, 2.0, 50.0]]  # medians 2, 3
    np.testing.assert_allclose(round_ratios(base, slim), [2.5, 2.0])
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        round_ratios(base, slim[:1])


def test_bootstrap_is_deterministic_by_seed() -> None:
    x = np.random.default_rng(0).lognormal(0.7, 0.1, size=30)
    a = bootstrap_ci(x, seed=7)
    assert a == bootstrap_ci(x, seed=7)
    assert a != bootstrap_ci(x, seed=8)
    assert a[0] < float(geometric_mean(x)) < a[1]


def test_bootstrap_of_the_mean_matches_the_normal_interval() -> None:
    """For n = 400 draws of N(0, 1) the 95% interval of the mean is about +-1.96 / 20."""
    x = np.random.default_rng(1).normal(0.0, 1.0, size=400)
    lo, hi = bootstrap_ci(x, statistic=np.mean, n_boot=4000, seed=0)
    half = 1.96 * np.std(x, ddof=1) / np.sqrt(x.size)
    assert lo == pytest.approx(np.mean(x) - half, abs=0.02)
    assert hi == pytest.approx(np.mean(x) + half, abs=0.02)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([], seed=0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], n_boot=0)


def _synthetic_rounds(rng: np.random.Generator, *, true_ratio: float, rounds: int = 30,
                      calls: int = 15, drift: float = 0.3, noise: float = 0.05):
    """Rounds where both models share a per-round slowdown (busy machine) plus call noise."""
    base_rounds, slim_rounds = [], []
    for _ in range(rounds):
        load = rng.lognormal(0.0, drift)  # hits base and slim of the same round alike
        base_rounds.append(2.0 * load * rng.lognormal(0.0, noise, size=calls))
        slim_rounds.append(2.0 / true_ratio * load * rng.lognormal(0.0, noise, size=calls))
    return base_rounds, slim_rounds


def test_paired_interval_contains_the_true_ratio() -> None:
    rng = np.random.default_rng(42)
    sp = paired_speedup(*_synthetic_rounds(rng, true_ratio=2.5), seed=0)
    assert sp.low <= 2.5 <= sp.high
    assert sp.low <= sp.value <= sp.high
    assert sp.high / sp.low < 1.05  # a 30% per-round drift cancels in the pairing
    assert sp.rounds == 30


def test_paired_interval_coverage_is_near_nominal() -> None:
    """Over 200 synthetic experiments the 95% interval holds the truth about 95% of the time."""
    rng = np.random.default_rng(2024)
    hits = 0
    for i in range(200):
        sp = paired_speedup(*_synthetic_rounds(rng, true_ratio=1.7), n_boot=1000, seed=i)
        hits += sp.low <= 1.7 <= sp.high
    assert 0.88 <= hits / 200 <= 0.995


def test_identical_samples_give_exactly_one() -> None:
    rounds = [[1.0, 2.0, 3.0]] * 5
    sp = paired_speedup(rounds, rounds)
    assert (sp.value, sp.low, sp.high) == (1.0, 1.0, 1.0)
