"""The ``speedup``/``latency`` allocator plugin (entry point ``deploy_prune.allocators``).

1. Measure (or reuse) the latency table of the prunable nodes on the configured backend.
2. Solve the multiple-choice knapsack: per-node widths maximising the summed importance of kept
   channels (importance(k) = sum of a node's top-k scores) with the additive prediction within
   the budget; crucial nodes stay whole, widths come from the grid (floors and rounding).
3. Cut, measure the real model against the base (paired); if it misses the request by more
   than ``allocation.tolerance``, recalibrate the budget by predicted/measured and re-solve
   (at most ``MAX_ROUNDS`` times). The closest measured candidate is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.latency.latency_table import LatencyTable, cached_table
from bench.latency.probe import CHECK, Probe
from bench.latency.solver import Solution, importance_options, solve
from deploy_prune.allocation import (
    Allocation,
    AllocationError,
    finish_allocation,
    group_counts,
    group_ties,
    keep_top,
    prunable_nodes,
)
from deploy_prune.artifacts import ModelPlan
from deploy_prune.config import AllocationConfig
from deploy_prune.nodes import Node
from deploy_prune.scoring import Scores

log = logging.getLogger(__name__)
MAX_ROUNDS = 5


@dataclass
class Candidate:
    """One solved and measured allocation (latencies in ms on the base's current scale)."""

    budget_ms: float
    widths: dict[str, int]
    predicted_ms: float
    measured_ms: float


def request_ms(cfg: AllocationConfig, base_ms: float) -> float:
    """The latency asked for: ``latency_ms``, or the base latency over ``speedup``."""
    if cfg.target == "latency":
        if cfg.latency_ms is None or cfg.latency_ms <= 0:
            raise AllocationError(f"allocation.target=latency needs allocation.latency_ms > 0, got {cfg.latency_ms}")
        return float(cfg.latency_ms)
    if cfg.speedup < 1.0:
        raise AllocationError(f"allocation.speedup must be >= 1.0 (2.0 = twice as fast), got {cfg.speedup}")
    return base_ms / cfg.speedup


class LatencyAllocator:
    """Allocation to a measured latency or speedup on ``cfg.backend``/``cfg.device``."""

    def allocate(self, model: nn.Module, nodes: list[Node], scores: Scores, example: torch.Tensor, *,
                 crucial: list[str], cfg: AllocationConfig, plan: ModelPlan,
                 selection: Scores | None = None) -> Allocation:
        prunable = prunable_nodes(nodes, crucial)
        self._groups = group_counts(nodes)  # grouped-conv nodes keep whole positions per group
        self._ties = group_ties(nodes)  # or lose whole groups, the same in every tied node
        pick = selection or scores
        with Probe(model, plan, backend=cfg.backend, device=cfg.device, precision=cfg.precision,
                   batch=cfg.batch) as probe:
            table = cached_table(probe, prunable, cfg)
            scale = probe.base_ms / table.base_ms  # drift since the table was measured
            target = request_ms(cfg, probe.base_ms)
            best, rounds = self._close_loop(probe, table, scale, scores, pick, target, cfg)
            meta = self._latency_info(probe, table, target, best, rounds)
        return finish_allocation(model, nodes, pick, best.widths, example, crucial=crucial,
                                 extra={"latency": meta})

    def _close_loop(self, probe: Probe, table: LatencyTable, scale: float, scores: Scores, pick: Scores,
                    target: float, cfg: AllocationConfig) -> tuple[Candidate, list[Candidate]]:
        """Solve, measure, recalibrate the budget; the candidate measured closest to ``target``."""
        rounds: list[Candidate] = []
        measured: dict[tuple, float] = {}
        budget = target
        for _ in range(MAX_ROUNDS):
            sol = solve_table(table, scores, budget / scale)
            if sol is None:
                raise AllocationError(self._out_of_reach(table, scale, target))
            key = tuple(sorted(sol.widths.items()))
            if key not in measured:
                measured[key] = probe.latency(keep_top(pick, sol.widths, self._groups, self._ties), timing=CHECK)
            cand = Candidate(budget, sol.widths, scale * (table.base_ms + sol.cost), measured[key])
            rounds.append(cand)
            log.info("latency allocation: budget %.3f ms -> predicted %.3f, measured %.3f (target %.3f)",
                     budget, cand.predicted_ms, cand.measured_ms, target)
            if abs(cand.measured_ms / target - 1) <= cfg.tolerance:
                break
            budget *= target / cand.measured_ms  # the model's error near here, taken as a ratio
        best = min(rounds, key=lambda c: abs(c.measured_ms / target - 1))
        if abs(best.measured_ms / target - 1) > cfg.tolerance:
            log.warning("closest measured latency %.3f ms is %.1f%% off the %.3f ms request "
                        "(a finer allocation.grid allows closer)", best.measured_ms,
                        100 * abs(best.measured_ms / target - 1), target)
        return best, rounds

    @staticmethod
    def _out_of_reach(table: LatencyTable, scale: float, target: float) -> str:
        floor = table.base_ms + sum(min(table.delta(n)) for n in table.widths)
        return (f"a latency of {target:.3f} ms is out of reach on {table.key['backend']}/{table.key['device']}: "
                f"with the crucial nodes whole and the per-node minimum the prediction is at least "
                f"{scale * floor:.3f} ms (base {scale * table.base_ms:.3f} ms); fewer crucial nodes or "
                "a lower allocation.min_fraction allow more")

    @staticmethod
    def _latency_info(probe: Probe, table: LatencyTable, target: float, best: Candidate,
                      rounds: list[Candidate]) -> dict[str, Any]:
        """What plan.json and report.json carry under ``latency``."""
        return {**probe.describe(), "base_ms": probe.base_ms, "requested_ms": target,
                "predicted_ms": best.predicted_ms, "measured_ms": best.measured_ms,
                "measured_speedup": probe.base_ms / best.measured_ms,
                "table_seconds": table.seconds, "table_created": table.created,
                "rounds": [{"budget_ms": c.budget_ms, "predicted_ms": c.predicted_ms,
                            "measured_ms": c.measured_ms, "widths": c.widths} for c in rounds]}


def solve_table(table: LatencyTable, scores: Scores, budget_ms: float) -> Solution | None:
    """Knapsack over ``table``: widths maximising kept importance with prediction <= budget."""
    options = {n: importance_options(np.asarray(scores[n]), table.widths[n], table.delta(n))
               for n in table.widths}
    return solve(options, budget_ms - table.base_ms)
