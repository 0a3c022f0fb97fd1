"""Crucial nodes and global allocation (METHOD.md section 3).

The N highest-scoring nodes are *crucial*: never narrowed, and mimicked in recovery; the last
conv node is always among them. The channels of all other nodes are ranked together by score
and the lowest are removed until one global target is met, so per-layer widths fall out of the
scores. FLOPs are counted on the real cut model, never by formula.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from deploy_prune._registry import Registry
from deploy_prune.artifacts import ModelPlan
from deploy_prune.config import AllocationConfig
from deploy_prune.decisions import (  # noqa: F401 (select_crucial, round_width: re-exported)
    AUTO_ROUND,
    AllocationError,
    CostFn,
    Decision,
    Scores,
    auto_round_to,
    floor_width,
    resolve_round_to,
    round_width,
    select_crucial,
)
from deploy_prune.flops import Cost, count
from deploy_prune.nodes import Node
from deploy_prune.surgery import Plan, apply_plan

log = logging.getLogger(__name__)


def keep_top(scores: Scores, counts: Mapping[str, int], groups: Mapping[str, int] | None = None,
             ties: Mapping[str, str] | None = None) -> Plan:
    """Plan keeping, in each node, the ``counts[node]`` highest-scoring channels.

    A node tied to a grouped conv (``groups[node] = G > 1``) keeps ``k / G`` positions (``k``
    rounded to a multiple of G) in each of its G channel blocks, the same positions in every
    block, chosen by their score summed over the blocks; the conv keeps its G groups.

    Nodes sharing a tie (``ties[node]``, see ``Node.tie``) instead keep whole blocks, the same
    ones in all of them: the unit keeps ``round(sum of counts / sum of block widths)`` groups,
    those whose channels (in every node of the unit) have the highest mean score."""
    plan = {}
    ties = ties or {}
    units: dict[str, list[str]] = {}
    for name in counts:
        if name in ties:
            units.setdefault(ties[name], []).append(name)
    for members in units.values():
        plan.update(_keep_groups(scores, counts, members, (groups or {})[members[0]]))
    for name, k in counts.items():
        if name in ties:
            continue
        s = np.asarray(scores[name])
        g = (groups or {}).get(name, 1)
        if g > 1:
            k = min(len(s), max(g, int(round(k / g)) * g))
        if k >= len(s):
            continue
        if g > 1:
            width = len(s) // g
            pos = np.argsort(-s.reshape(g, width).sum(0), kind="stable")[:k // g]
            plan[name] = sorted(int(p + b * width) for b in range(g) for p in pos)
            continue
        idx = np.argsort(-s, kind="stable")[:k]
        plan[name] = sorted(int(i) for i in idx)
    return plan


def group_scores(scores: Scores, members: list[str], groups: int) -> np.ndarray:
    """One score per group of a tied unit: the mean over the group's channels in all its nodes.

    The mean, not the sum: the global ranking compares it with single channels' scores (each
    group then counts as its channels), and inside the unit every group has as many channels,
    so the choice of groups is the same as by the sum."""
    per = [np.asarray(scores[m], dtype=np.float64).reshape(groups, -1) for m in members]  # (G, w) each
    return np.concatenate(per, axis=1).mean(axis=1)  # (G,)


def _keep_groups(scores: Scores, counts: Mapping[str, int], members: list[str], groups: int) -> Plan:
    """The plan of one tied unit: the same best whole groups in every member."""
    blocks = {m: len(scores[m]) // groups for m in members}
    k = int(round(sum(counts[m] for m in members) / sum(blocks.values())))
    k = min(groups, max(1, k))
    if k >= groups:
        return {}
    best = np.sort(np.argsort(-group_scores(scores, members, groups), kind="stable")[:k])
    return {m: [int(g * w + j) for g in best for j in range(w)] for m, w in blocks.items()}


def group_counts(nodes: list[Node]) -> dict[str, int]:
    """Node name -> channel groups, for the nodes tied to grouped convs."""
    return {n.name: n.groups for n in nodes if n.groups > 1}


def group_ties(nodes: list[Node]) -> dict[str, str]:
    """Node name -> its tied unit, for the nodes that lose whole groups together."""
    return {n.name: n.tie for n in nodes if n.tie}


@dataclass
class Allocation:
    counts: dict[str, int]  # node -> kept channels
    plan: Plan  # node -> kept indices (nodes kept whole are absent)
    crucial: list[str]
    base_flops: int
    flops: int
    base_params: int
    params: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (channels removed, reduction)
    extra: dict[str, Any] = field(default_factory=dict)  # plugin facts (latency), into plan.json

    @property
    def flops_reduction(self) -> float:
        return self.base_flops / max(self.flops, 1)


class _Ranking:
    """Channels of the prunable nodes in ascending score order, and the counts for a cut."""

    def __init__(self, nodes: list[Node], scores: Scores, cfg: AllocationConfig) -> None:
        self.nodes, self.cfg = nodes, cfg
        self.round_to = resolve_round_to(cfg.round_to, cfg.device)
        scores = tied_scores(nodes, scores)
        keys, vals = [], []
        for i, n in enumerate(nodes):
            s = np.asarray(scores[n.name], dtype=np.float64)
            if cfg.normalize == "mean" and s.mean() > 0:  # per-layer scale (L1 norms): relative to the node
                s = s / s.mean()
            if cfg.method == "uniform":  # rank-normalise: equal fractions from every node
                s = 1.0 - np.argsort(np.argsort(-s, kind="stable"), kind="stable") / n.channels
            elif cfg.method != "global":
                raise AllocationError(f"allocation.method: expected global or uniform, got {cfg.method!r}")
            keys.append(np.full(n.channels, i))
            vals.append(s)
        self.owner = np.concatenate(keys) if keys else np.zeros(0, int)
        self.order = np.argsort(np.concatenate(vals) if vals else np.zeros(0), kind="stable")
        self.total = len(self.order)

    def min_keep(self, c: int) -> int:
        return min_keep(c, self.cfg)

    def counts(self, k: int) -> dict[str, int]:
        removed = np.bincount(self.owner[self.order[:k]], minlength=len(self.nodes))
        out = {}
        for i, n in enumerate(self.nodes):
            kept = max(n.channels - int(removed[i]), self.min_keep(n.channels))
            # grouped: whole positions of every group (widths stay multiples of the group count)
            out[n.name] = round_width(kept, n.channels, n.groups if n.groups > 1 else self.round_to)
        return self._whole_groups(out, removed)

    def _whole_groups(self, out: dict[str, int], removed: np.ndarray) -> dict[str, int]:
        """Tied units keep one number of whole groups in all their nodes: the unit's kept
        channels over its group width, at least every node's floor, at least one group."""
        units: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            if n.tie:
                units.setdefault(n.tie, []).append(i)
        for idx in units.values():
            nodes = [self.nodes[i] for i in idx]
            g = nodes[0].groups
            width = sum(n.channels for n in nodes) // g
            kept = int(round(sum(n.channels - int(removed[i]) for i, n in zip(idx, nodes)) / width))
            floor = max(math.ceil(self.min_keep(n.channels) * g / n.channels) for n in nodes)
            kept = min(g, max(kept, floor, 1))
            out.update({n.name: kept * n.channels // g for n in nodes})
        return out


def tied_scores(nodes: list[Node], scores: Scores) -> Scores:
    """``scores`` with each tied unit's channels given their group's score (``group_scores``),
    so that the global ranking removes a unit's groups whole, at their mean channel score."""
    units: dict[str, list[Node]] = {}
    for n in nodes:
        if n.tie:
            units.setdefault(n.tie, []).append(n)
    if not units:
        return scores
    out = dict(scores)
    for members in units.values():
        g = members[0].groups
        per_group = group_scores(scores, [n.name for n in members], g)  # (G,)
        out.update({n.name: np.repeat(per_group, n.channels // g) for n in members})
    return out


# Targets served by plugin allocators (entry-point group ``deploy_prune.allocators``): they
# need measurements (bench), which the core never imports.
PLUGIN_TARGETS = ("speedup", "latency")
ALLOCATOR_GROUP = "deploy_prune.allocators"

# allocation.target values: the core's own targets, plus any installed plugin target (resolved
# by entry-point name only: checking a name never imports the plugin's code)
ALLOCATION_TARGETS: Registry[str] = Registry("allocation target")
ALLOCATION_TARGETS.register("flops")("allocation.flops_reduction times fewer FLOPs")
ALLOCATION_TARGETS.register("channels")("keep allocation.keep_fraction of the prunable channels")
ALLOCATION_TARGETS.set_fallback(
    lambda name: f"plugin {name}" if any(ep.name == name for ep in entry_points(group=ALLOCATOR_GROUP))
    else None)


class TargetAllocator(Protocol):
    """A plugin allocator: base model + channel scores -> an :class:`Allocation` for ``cfg``."""

    def allocate(self, model: nn.Module, nodes: list[Node], scores: Scores, example: torch.Tensor, *,
                 crucial: list[str], cfg: AllocationConfig, plan: ModelPlan,
                 selection: Scores | None = None) -> Allocation: ...


def load_allocator(target: str) -> TargetAllocator:
    """The plugin allocator registered for ``target`` (an instance), or a clear error."""
    found = {ep.name: ep for ep in entry_points(group=ALLOCATOR_GROUP)}
    if target not in found:
        raise AllocationError(
            f"allocation.target={target} needs the latency allocator from the bench package, "
            f"but no {ALLOCATOR_GROUP!r} entry point named {target!r} is installed (found: "
            f"{sorted(found) or 'none'}); run `pip install -e .` in the deploy-prune checkout")
    return found[target].load()()


DEFAULT_ROUND_TO = 8


def rounding_note(cfg: AllocationConfig, used: int | None = None) -> dict[str, Any]:
    """Why the kept widths are multiples of ``cfg.round_to``: recorded in plan.json (``rounding``).

    ``used``: the finer rounding the allocation fell back to when the target was out of reach."""
    if cfg.round_to == AUTO_ROUND:
        m, why = auto_round_to(cfg.device)
    else:
        m = int(cfg.round_to)
        if m <= 1:
            why = ("requested: exact widths; on ONNX Runtime CPU they measured slower per FLOP than "
                   "multiples of 8 (ResNet-50 at 2.8x fewer FLOPs: 2.04x vs 2.43x, "
                   "docs/results/paper_claims.md), and depthwise nets could end slower than their base")
        else:
            why = f"requested: multiples of {m}"
    note = {"round_to": m, "setting": cfg.round_to, "backend": cfg.backend, "device": cfg.device,
            "reason": why}
    if used is not None and used != m:
        note.update(round_to=used, requested=m,
                    reason=f"round_to={m} could not meet the target within allocation.tolerance; fell back "
                    f"to {used}. {why}")
    return note


def with_rounding(cfg: AllocationConfig) -> tuple[AllocationConfig, bool]:
    """``cfg`` with ``round_to`` as a number (``auto`` resolved for ``cfg.device``), and whether
    that multiple is a default (auto, or at most 8) that may fall back to a finer one."""
    m = resolve_round_to(cfg.round_to, cfg.device)
    return dataclasses.replace(cfg, round_to=m), cfg.round_to == AUTO_ROUND or 1 < m <= DEFAULT_ROUND_TO


def min_keep(channels: int, cfg: AllocationConfig) -> int:
    """The per-node floor of METHOD.md section 3 (at least ``min_channels`` and ``min_fraction``)."""
    return floor_width(channels, cfg.min_channels, cfg.min_fraction)


def prunable_nodes(nodes: list[Node], crucial: list[str]) -> list[Node]:
    """The nodes an allocator may narrow; an error when the crucial set leaves none."""
    # a crucial (or fixed) node keeps its whole tied unit: its partners' groups cannot go alone
    fixed_ties = {n.tie for n in nodes if n.tie and (n.name in crucial or not n.prunable)}
    prunable = [n for n in nodes if n.name not in crucial and n.prunable and n.tie not in fixed_ties]
    if not prunable:
        fixed = [n for n in nodes if not n.prunable]
        why = (f"; {len(fixed)} of {len(nodes)} nodes are kept whole (e.g. {fixed[0].name}: "
               + (fixed[0].fixed or f"tied to grouped convolutions whose {fixed[0].groups} groups do not "
                  f"divide its {fixed[0].channels} channels") + ")") if fixed else ""
        raise AllocationError(f"no prunable node is left outside the crucial set {crucial}{why}")
    return prunable


def finish_allocation(model: nn.Module, nodes: list[Node], pick: Scores, counts: dict[str, int],
                      example: torch.Tensor, *, crucial: list[str], base: Cost | None = None,
                      **fields: Any) -> Allocation:
    """The :class:`Allocation` that keeps ``counts`` channels (by ``pick``) of the prunable nodes;
    ``fields`` fills the rest (``history``, ``extra``)."""
    plan = keep_top(pick, counts, group_counts(nodes), group_ties(nodes))
    base = base or count(model, example)
    slim = count(cut(model, plan, example, nodes=nodes), example)
    return Allocation(counts={**{n.name: n.channels for n in nodes}, **counts}, plan=plan, crucial=crucial,
                      base_flops=base.flops, flops=slim.flops, base_params=base.params, params=slim.params,
                      **fields)


def allocate(
    model: nn.Module,
    nodes: list[Node],
    scores: Scores,
    example: torch.Tensor,
    *,
    crucial: list[str],
    cfg: AllocationConfig,
    selection: Scores | None = None,
) -> Allocation:
    """Global allocation to ``cfg``'s target; ``selection`` picks channels (default: ``scores``).

    When a FLOPs target cannot be met within ``cfg.tolerance`` at the default rounding (or a
    finer one), because small nodes cannot go below one multiple or the nearest multiples
    overshoot or undershoot, the rounding is halved until it is met, with a warning; the rounding
    used is in ``extra["round_to"]``.
    """
    cfg, may_refine = with_rounding(cfg)
    while True:
        try:
            alloc = _allocate(model, nodes, scores, example, crucial=crucial, cfg=cfg, selection=selection,
                              strict=may_refine)
        except OutOfReach as e:
            if not (may_refine and cfg.round_to > 1):  # a coarser rounding was asked for: honour it
                raise
            finer = dataclasses.replace(cfg, round_to=cfg.round_to // 2)
            log.warning("%s at round_to=%d; retrying with round_to=%d", e, cfg.round_to, finer.round_to)
            cfg = finer
            continue
        alloc.extra.setdefault("round_to", cfg.round_to)
        return alloc


class OutOfReach(AllocationError):
    """The target cannot be met with these floors and this rounding."""


def _allocate(
    model: nn.Module,
    nodes: list[Node],
    scores: Scores,
    example: torch.Tensor,
    *,
    crucial: list[str],
    cfg: AllocationConfig,
    selection: Scores | None = None,
    strict: bool = False,
) -> Allocation:
    prunable = prunable_nodes(nodes, crucial)
    base = count(model, example)
    ranking = _Ranking(prunable, scores, cfg)
    pick = selection or scores
    groups, ties = group_counts(nodes), group_ties(nodes)
    cache: dict[tuple, int] = {}

    def flops_at(k: int) -> tuple[int, dict[str, int]]:
        counts = ranking.counts(k)
        key = tuple(sorted(counts.items()))
        if key not in cache:
            cache[key] = count(cut(model, keep_top(pick, counts, groups, ties), example, nodes=nodes), example).flops
        return cache[key], counts

    history: list[tuple[int, float]] = []
    if cfg.target == "flops":
        k = _search(flops_at, ranking.total, base.flops, cfg, history, strict=strict)
    elif cfg.target == "channels":
        if not 0 < cfg.keep_fraction <= 1:
            raise AllocationError(f"allocation.keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
        k = int(round((1 - cfg.keep_fraction) * ranking.total))
        kept = sum(ranking.counts(k).values()) / max(ranking.total, 1)
        if strict and cfg.round_to > 1 and abs(kept / cfg.keep_fraction - 1) > cfg.tolerance:
            raise OutOfReach(f"at multiples of {cfg.round_to} the nearest widths keep {100 * kept:.1f}% of the "
                             f"prunable channels, not {100 * cfg.keep_fraction:.1f}%")
    else:
        raise AllocationError(f"allocation.target {cfg.target!r} is not handled by FLOPs/channel "
                              "allocation (use flops or channels, or the latency allocator)")
    _, counts = flops_at(k)
    return finish_allocation(model, nodes, pick, counts, example, crucial=crucial, base=base, history=history)


def whole_cost(model: nn.Module, nodes: list[Node], scores: Scores, example: torch.Tensor, *,
               keep: list[str], cfg: AllocationConfig, selection: Scores | None = None,
               marginal: bool = True) -> CostFn | None:
    """What keeping nodes whole costs at ``cfg``'s FLOPs target: ``cost(node, whole)`` is the
    FLOPs that ``node``'s full width adds to the slim model the global ranking gives (with only
    ``keep`` whole), when the nodes ``whole`` are already kept whole too, as a share of that
    model's budget (base FLOPs / target). A crucial node is never narrowed: a share of 0.4 means
    the other nodes must give up 40% of the slim model's FLOPs to pay for it. Costs are joint
    because a conv between two whole nodes costs both its sides.

    The cost is infinite when the target can no longer be met at ``cfg``'s rounding with the
    set kept whole (every other node at its floor): costs are measured at the other nodes'
    natural widths, and a set can look cheap there and still leave too little to cut.

    ``marginal=False``: only whether the set still fits (0 or infinite), without the global
    ranking's allocation the shares are measured against (what ``select=score`` needs).

    ``None`` when the target is not FLOPs, or cannot be met with only ``keep`` whole (the
    allocation that follows then says why). Each new set costed cuts and counts a copy or two."""
    if cfg.target != "flops":
        return None
    base_flops = count(model, example).flops
    ref = None
    if marginal:
        quiet, log.disabled = log.disabled, True  # its rounding fallbacks are the real allocation's to report
        try:
            ref = allocate(model, nodes, scores, example, crucial=keep, cfg=cfg, selection=selection)
        except AllocationError:
            return None
        finally:
            log.disabled = quiet
    budget = base_flops / cfg.flops_reduction
    pick = selection or scores
    groups, ties = group_counts(nodes), group_ties(nodes)
    memo: dict[frozenset[str], int] = {frozenset(): ref.flops} if ref else {}

    def flops(whole: frozenset[str]) -> int:
        assert ref is not None
        if whole not in memo:
            tied = {m.tie for m in nodes if m.name in whole and m.tie}  # a tie goes whole together
            counts = {**ref.counts, **{m.name: m.channels for m in nodes if m.name in whole or m.tie in tied}}
            memo[whole] = count(cut(model, keep_top(pick, counts, groups, ties), example, nodes=nodes), example).flops
        return memo[whole]

    reachable: dict[frozenset[str], bool] = {}

    def reaches(whole: frozenset[str]) -> bool:
        """Can the target still be met with ``whole`` kept whole too, at ``cfg``'s rounding
        (every other node at its floor)?"""
        if whole not in reachable:
            try:
                ranking = _Ranking(prunable_nodes(nodes, [*keep, *whole]), scores, cfg)
            except AllocationError:
                reachable[whole] = False
                return False
            floor = count(cut(model, keep_top(pick, ranking.counts(ranking.total), groups, ties), example,
                              nodes=nodes), example).flops
            reachable[whole] = base_flops / max(floor, 1) >= cfg.flops_reduction * (1 - cfg.tolerance)
        return reachable[whole]

    def cost(name: str, whole: tuple[str, ...] = ()) -> float:
        before = frozenset(whole)
        if not reaches(before | {name}):
            return math.inf
        if ref is None:
            return 0.0
        return max(0.0, (flops(before | {name}) - flops(before)) / budget)

    return cost


def decided(model: nn.Module, nodes: list[Node], scores: Scores, example: torch.Tensor,
            decision: Decision) -> Allocation:
    """The :class:`Allocation` of widths a scorer decided itself (RBP), filled by its scores."""
    decision.check(nodes)
    counts = {k: v for k, v in decision.counts(nodes).items()}
    return finish_allocation(model, nodes, scores, counts, example, crucial=list(decision.crucial),
                             extra={"decided_by": decision.by})


def _search(flops_at, total: int, base_flops: int, cfg: AllocationConfig, history, *,
            strict: bool = False) -> int:
    """Smallest number of removed channels meeting the FLOPs reduction, or the closer neighbour."""
    target = cfg.flops_reduction
    if target < 1.0:
        raise AllocationError(f"allocation.flops_reduction must be >= 1.0 (3.0 = 3x fewer FLOPs), got {target}")
    red = lambda k: base_flops / max(flops_at(k)[0], 1)  # noqa: E731
    best = red(total)
    if best < target * (1 - cfg.tolerance):
        raise OutOfReach(
            f"a {target:.2f}x FLOPs reduction is out of reach: with the crucial nodes kept and the "
            f"per-node minimum, the most is {best:.2f}x (fewer crucial nodes, or a lower "
            "allocation.min_fraction, allow more)")
    k = _first_meeting(lambda i: flops_at(i)[0], total, base_flops, target, history)
    if k > 0 and abs(red(k - 1) - target) < abs(red(k) - target):
        k -= 1
    achieved = red(k)
    if abs(achieved / target - 1) > cfg.tolerance and strict and cfg.round_to > 1:
        # the default rounding is a speed preference, not worth missing the target: allocate()
        # retries at a finer multiple (a coarser one asked for explicitly is honoured below)
        raise OutOfReach(f"at multiples of {cfg.round_to} the nearest widths give {achieved:.2f}x, "
                         f"{100 * abs(achieved / target - 1):.1f}% off the {target:.2f}x FLOPs target "
                         f"(allocation.tolerance {cfg.tolerance:g})")
    if abs(achieved / target - 1) > cfg.tolerance:
        log.warning("FLOPs reduction %.3fx is %.1f%% off the %.2fx target (round_to=%d is coarse)",
                    achieved, 100 * abs(achieved / target - 1), target, cfg.round_to)
    return k


def _first_meeting(flops: Callable[[int], int], total: int, base_flops: int, target: float,
                   history: list[tuple[int, float]]) -> int:
    """Smallest ``k`` in [0, total] whose reduction ``base_flops / flops(k)`` reaches ``target``
    (``flops`` does not rise with ``k``, and ``flops(total)`` reaches it): the answer a bisection
    gives, in fewer evaluations.

    Each evaluation cuts a copy of the model (seconds on a concat-heavy net: torch-pruning maps
    every concat's indices), so the next probe is interpolated on FLOPs between the bracket's
    ends (FLOPs fall smoothly with k); a probe that does not halve the bracket makes the next one
    a plain bisection, so it never takes more than about twice bisection's probes."""
    goal = base_flops / target
    lo, hi = 0, total  # the answer is in [lo, hi]; k = hi reaches the target
    a, fa = 0, float(base_flops)  # interpolation anchors: k = 0 removes nothing
    fb = float(flops(hi))
    bisect = False
    while lo < hi:
        if bisect or fa <= fb:
            mid = (lo + hi) // 2
        else:
            mid = a + int(round((hi - a) * (fa - goal) / (fa - fb)))
            mid = min(max(mid, lo), hi - 1)
        width = hi - lo
        f = flops(mid)
        r = base_flops / max(f, 1)
        history.append((mid, r))
        if r >= target:
            hi, fb = mid, float(f)
        else:
            lo, a, fa = mid + 1, mid, float(f)
        bisect = not bisect and (hi - lo) > width // 2
    return lo


def cut(model: nn.Module, plan: Plan, example: torch.Tensor, *, nodes: list[Node] | None = None) -> nn.Module:
    """A cut copy of ``model`` (the original is untouched); ``nodes``: ``model``'s nodes, when known."""
    slim = copy.deepcopy(model).cpu()
    return apply_plan(slim, plan, example, nodes=nodes)
