"""Multiple-choice knapsack over latency tables: one width per node, most importance in budget.

Each node ``g`` offers options ``(cost_g(k), value_g(k))``: the latency the model gains (ms,
negative when it saves) when that node keeps ``k`` channels, and the summed score of its top-``k``
channels. The prediction is additive, ``base + sum_g cost_g(k_g)``, and the solver maximises
``sum_g value_g(k_g)`` subject to the prediction not exceeding the budget.

Dynamic programming over a discretised cost axis: each option's cost above its node's cheapest
option is rounded *up* to a whole number of bins, so any selection the DP accepts has a true
(unrounded) predicted latency within the budget. With costs that are exact multiples of the
bin width the DP is exact (the brute-force test checks that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 4000


@dataclass(frozen=True)
class Option:
    """One choice for one node: keep ``width`` channels, adding ``cost`` ms, worth ``value``."""

    width: int
    cost: float
    value: float


@dataclass(frozen=True)
class Solution:
    widths: dict[str, int]
    cost: float  # sum of the chosen options' unrounded costs (ms)
    value: float


def solve(options: Mapping[str, Sequence[Option]], capacity: float, *, bins: int = DEFAULT_BINS,
          resolution: float | None = None) -> Solution | None:
    """Best selection (one option per node) with ``sum cost <= capacity``; ``None`` if none fits.

    ``resolution`` fixes the bin width (ms); by default the slack above the cheapest selection
    is split into ``bins`` bins.
    """
    groups = list(options)
    if any(not options[g] for g in groups):
        raise ValueError(f"every node needs at least one option; empty: {[g for g in groups if not options[g]]}")
    floor = {g: min(o.cost for o in options[g]) for g in groups}
    slack = capacity - sum(floor.values())
    if slack < -1e-12:
        return None
    step = resolution if resolution else max(slack, 1e-12) / bins
    n_bins = int(math.floor(slack / step + 1e-9))
    weights = {g: [int(math.ceil((o.cost - floor[g]) / step - 1e-9)) for o in options[g]] for g in groups}
    dp = np.full(n_bins + 1, -np.inf)  # dp[b]: best value using exactly b bins so far
    dp[0] = 0.0
    picks: list[np.ndarray] = []
    for g in groups:
        new, pick = np.full(n_bins + 1, -np.inf), np.full(n_bins + 1, -1, dtype=np.int64)
        for j, (o, w) in enumerate(zip(options[g], weights[g])):
            if w > n_bins:
                continue
            cand = np.full(n_bins + 1, -np.inf)
            cand[w:] = dp[:n_bins + 1 - w] + o.value
            better = cand > new
            new[better], pick[better] = cand[better], j
        dp = new
        picks.append(pick)
    if not np.isfinite(dp).any():
        return None
    b = int(np.argmax(dp))  # first maximum: the cheapest of equally valuable selections
    chosen: dict[str, Option] = {}
    for g, pick in zip(reversed(groups), reversed(picks)):
        j = int(pick[b])
        chosen[g] = options[g][j]
        b -= weights[g][j]
    assert b == 0, "knapsack backtrack must end at bin 0"
    return Solution(widths={g: chosen[g].width for g in groups},
                    cost=float(sum(o.cost for o in chosen.values())),
                    value=float(sum(o.value for o in chosen.values())))


def importance_options(scores: np.ndarray, widths: Sequence[int], costs: Sequence[float]) -> list[Option]:
    """Options for one node: importance(k) = sum of its ``k`` highest channel scores."""
    top = np.cumsum(np.sort(np.asarray(scores, dtype=np.float64))[::-1])  # (C,) descending prefix sums
    return [Option(width=int(k), cost=float(c), value=float(top[k - 1])) for k, c in zip(widths, costs)]
