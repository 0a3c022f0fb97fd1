"""Pure statistics for latency samples and paired speedups (numpy only, no torch).

Percentiles follow the usual linear-interpolation definition (Hyndman & Fan type 7, numpy's
default), so a figure here can be checked against ``numpy.percentile``. A speedup is estimated
from *paired rounds*: in each round the base and the slim model are timed back to back, the
round's ratio is ``median(base) / median(slim)``, and the speedup is the geometric mean of the
round ratios. Its confidence interval is a seeded percentile bootstrap over rounds, so that
slow drifts of the machine (other processes, clocks, heat) which hit both models in the same
round cancel in the ratio instead of widening the interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _as_sorted(samples: ArrayLike) -> np.ndarray:
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("no samples: a statistic needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or infinity")
    return x


def percentile(samples: ArrayLike, q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between order statistics.

    For sorted values x_0..x_{n-1}, position h = (n - 1) * q / 100 and the result is
    x_floor(h) + (h - floor(h)) * (x_ceil(h) - x_floor(h)) (type 7, numpy's default).
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    x = _as_sorted(samples)
    h = (x.size - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, x.size - 1)
    return float(x[lo] + (h - lo) * (x[hi] - x[lo]))


@dataclass(frozen=True)
class Summary:
    """Location and spread of one variant's latency samples (milliseconds)."""

    n: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float


def summarize(samples_ms: ArrayLike) -> Summary:
    """Count, mean, sample standard deviation, min, p50, p90, p99 and max."""
    x = _as_sorted(samples_ms)
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return Summary(n=int(x.size), mean=float(np.mean(x)), std=std, min=float(x[0]),
                   p50=percentile(x, 50), p90=percentile(x, 90), p99=percentile(x, 99),
                   max=float(x[-1]))


def round_ratios(base_rounds: Sequence[ArrayLike], slim_rounds: Sequence[ArrayLike]) -> np.ndarray:
    """Per-round ratio of medians, ``median(base_r) / median(slim_r)``: > 1 means slim is faster."""
    if len(base_rounds) != len(slim_rounds) or not base_rounds:
        raise ValueError(f"need the same, non-zero number of rounds for base and slim, got "
                         f"{len(base_rounds)} and {len(slim_rounds)}")
    ratios = [percentile(b, 50) / percentile(s, 50) for b, s in zip(base_rounds, slim_rounds)]
    return np.asarray(ratios, dtype=np.float64)


def geometric_mean(values: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """exp(mean(log v)): the average of ratios that treats 2x and 0.5x symmetrically."""
    return np.exp(np.mean(np.log(values), axis=axis))


def bootstrap_ci(values: ArrayLike, *, statistic: Callable[..., np.ndarray] = geometric_mean,
                 confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over ``values`` (deterministic by ``seed``).

    ``statistic(array, axis=-1)`` must reduce the last axis; all resamples are drawn at once as
    an (n_boot, n) index matrix.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (n_boot, n)
    boots = np.asarray(statistic(x[idx], axis=-1), dtype=np.float64)  # (n_boot,)
    alpha = (1.0 - confidence) / 2.0
    return percentile(boots, 100 * alpha), percentile(boots, 100 * (1 - alpha))


@dataclass(frozen=True)
class Speedup:
    """A paired speedup estimate with its bootstrap interval."""

    value: float
    low: float
    high: float
    rounds: int


def paired_speedup(base_rounds: Sequence[ArrayLike], slim_rounds: Sequence[ArrayLike], *,
                   confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Speedup:
    """Speedup of slim over base: geometric mean of per-round median ratios, with its CI."""
    ratios = round_ratios(base_rounds, slim_rounds)
    low, high = bootstrap_ci(ratios, confidence=confidence, n_boot=n_boot, seed=seed)
    return Speedup(value=float(geometric_mean(ratios)), low=low, high=high, rounds=len(ratios))
