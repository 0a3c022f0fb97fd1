"""What every way of choosing widths shares: the crucial set, the per-node floor and rounding,
and a :class:`Decision` (widths a scorer decided itself, as data).

The global allocation (:mod:`deploy_prune.allocation`) derives widths from scores; RBP
(:mod:`deploy_prune.scoring.rbp`) decides them node by node while it learns. Both use the rules
here, and neither imports the other: the pipeline hands RBP's :class:`Decision` to the prune in
place of the allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploy_prune.config import RunConfig
from deploy_prune.nodes import Node, last_node

Scores = dict[str, np.ndarray]  # node name -> (C,) channel scores


class AllocationError(ValueError):
    """A target cannot be met, or the crucial set is invalid."""


def node_scores(scores: Scores) -> dict[str, float]:
    """Node score = mean channel score (OSPR eq. 4 prints a sum; the text says mean, and the
    mean lets wide and narrow layers compare)."""
    return {k: float(np.mean(v)) for k, v in scores.items()}


CRUCIAL_SELECT = ("score", "per_stage")
CostFn = Callable[[str, tuple[str, ...]], float]  # (node, nodes already kept whole) -> the share it adds


def select_crucial(nodes: list[Node], scores: Scores, *, n: int = 2, names: list[str] | None = None,
                   select: str = "score", stages: Mapping[str, Any] | None = None,
                   stem: str | None = None, cost: CostFn | None = None) -> list[str]:
    """Top-``n`` nodes by node score (or the explicit ``names``), plus the last conv node.

    ``select="per_stage"`` takes the top-``n`` with at most one node per stage (``stages``: node
    name -> its feature map's spatial size, :func:`deploy_prune.nodes.stage_of`) and never the
    ``stem`` node (the channels of the conv that reads the image, :func:`deploy_prune.nodes.stem_of`;
    ``None``: no exclusion) unless the N cannot be filled without it.

    ``cost`` (node, nodes already whole -> what keeping it whole adds, as a share of the slim
    model's FLOPs budget, infinite where the set could no longer reach the target:
    :func:`deploy_prune.allocation.whole_cost`): per_stage takes each stage's cheapest node of its
    few best-scored ones; either rule passes over a node that does not fit (see :func:`_fill`).
    Only the nodes a pick looks at are costed.
    """
    known = {nd.name for nd in nodes}
    if names:
        bad = [x for x in names if x not in known]
        if bad:
            raise AllocationError(f"crucial.nodes: unknown node(s) {bad}; nodes are: {sorted(known)}")
        flat = [nd.name for nd in nodes if nd.flat and nd.name in names]
        if flat:
            raise AllocationError(f"crucial.nodes: {flat} are hidden units of the classifier head (flat (B, F) "
                                  "features, no feature map to mimic); name conv nodes")
        chosen = list(names)
    else:
        if n < 2:
            raise AllocationError(f"crucial.n must be >= 2 (OSPR section 3), got {n}")
        ns = node_scores(scores)
        flat = {nd.name for nd in nodes if nd.flat}  # an MLP head's hidden units: no map to mimic
        ranked = sorted((k for k in ns if k not in flat), key=lambda k: -ns[k])
        if select not in CRUCIAL_SELECT:
            raise AllocationError(f"crucial.select: expected one of {', '.join(CRUCIAL_SELECT)}, got {select!r}")
        if select == "per_stage" and stages is None:
            raise AllocationError("crucial.select=per_stage needs the nodes' stages")
        # the stem's map is a linear filter of the pixels: mimicking it teaches little, and kept
        # whole it fixes the widest full-resolution input of the next conv (peers.md: beta chose
        # it on every base and lost to plain L1 by 0.41 points on one)
        if select == "per_stage" and stem in ranked:
            ranked = [k for k in ranked if k != stem] + [stem]  # the stem only to fill the N
        chosen = _fill(ranked, n, stages if select == "per_stage" else None, cost,
                       stem if select == "per_stage" else None)
    last = last_node(nodes).name
    if last not in chosen:
        chosen.append(last)
    order = {nd.name: nd.order for nd in nodes}
    return sorted(chosen, key=order.__getitem__)


STAGE_CANDIDATES = 4  # per_stage with costs: the stage's node is the cheapest of its best-scored few


def _size(stage: Any) -> float:
    return float(math.prod(stage)) if isinstance(stage, tuple | list) else 0.0


def _fill(ranked: list[str], n: int, stages: Mapping[str, Any] | None, cost: CostFn | None,
          stem: str | None = None) -> list[str]:
    """Up to ``n`` of ``ranked`` (best score first).

    Without ``stages``: in score order. With them: one node per stage, from the ``n`` stages of
    the best-scored nodes (the ``stem`` only where its stage has nothing else).

    With ``cost`` (see :func:`select_crucial`), a node is never taken when the set, with it, can
    no longer reach the target (infinite cost), and per_stage takes each stage's node as the
    cheapest, beside the nodes already taken, of its :data:`STAGE_CANDIDATES` best-scored nodes
    (any node of a stage gives a map at that resolution to mimic; beta's node scores within a
    stage differ by about 1%, the costs by several times). The chosen stages are filled from the
    highest resolution down (their nodes cost the most and constrain the rest); a stage with no
    node that fits is replaced by the next stage. If nothing fits, the score order (for the
    allocation to refuse in its own words).
    """
    chosen: list[str] = []
    if stages is None:
        for k in ranked:
            if len(chosen) >= n:
                break
            if cost is None or math.isfinite(cost(k, tuple(chosen))):
                chosen.append(k)
    else:
        by_stage: dict[Any, list[str]] = {}
        for k in ranked:
            by_stage.setdefault(stages[k], []).append(k)
        # stages by their best score
        queue = [[k for k in g if k != stem][:STAGE_CANDIDATES] or g[:1] for g in by_stage.values()]
        while queue and len(chosen) < n:
            take, queue = queue[:n - len(chosen)], queue[n - len(chosen):]
            for pool in sorted(take, key=lambda p: -_size(stages[p[0]])):  # highest resolution first
                if cost is None:
                    chosen.append(pool[0])
                    continue
                prices = {k: cost(k, tuple(chosen)) for k in pool}
                best = min(pool, key=lambda k: (prices[k], pool.index(k)))
                if math.isfinite(prices[best]):
                    chosen.append(best)
    if not chosen and cost is not None:
        return _fill(ranked, n, stages, None, stem)
    return chosen


def round_width(kept: int, channels: int, multiple: int) -> int:
    """Round a kept count to the nearest multiple (at least one multiple, at most all)."""
    if multiple <= 1:
        return kept
    return min(channels, max(multiple, int(round(kept / multiple)) * multiple))


AUTO_ROUND = "auto"


def auto_round_to(device: str) -> tuple[int, str]:
    """The width multiple ``allocation.round_to=auto`` stands for on ``device``, and why.

    Measured (docs/results/rounding.md): on an AVX-512 CPU, ONNX Runtime batch 1 at 2x fewer
    FLOPs ran resnet18 1.65x with widths in 16s against 1.48x in 8s, efficientnet_b0 1.72x
    against 1.47x; on GPUs 8 fills the fp16/bf16 tensor-core tiles."""
    from deploy_prune.host import simd

    if str(device).startswith("cuda"):
        return 8, ("auto on cuda: multiples of 8 fill tensor-core tiles (fp16/bf16); odd widths fall "
                   "back to padded or slower kernels")
    isa = simd()
    if isa == "avx512":
        return 16, ("auto on an AVX-512 CPU: ONNX Runtime (MLAS NCHWc) and oneDNN block channels in "
                    "16s, so a width of 24 costs what 32 does; measured at 2x fewer FLOPs, ORT b1: "
                    "resnet18 1.65x (16) vs 1.48x (8), efficientnet_b0 1.72x vs 1.47x "
                    "(docs/results/rounding.md)")
    return 8, (f"auto on a CPU with {isa.upper() if isa != 'other' else 'no AVX2/AVX-512'}: ONNX Runtime "
               "and oneDNN block channels in 8s (AVX2); measured on ORT CPU, widths in 8s ran ResNet-50 "
               "2.43x vs 2.04x at exact widths (docs/results/paper_claims.md)")


def resolve_round_to(round_to: int | str, device: str) -> int:
    """``allocation.round_to`` as a number: ``auto`` becomes :func:`auto_round_to`'s multiple."""
    if round_to == AUTO_ROUND:
        return auto_round_to(device)[0]
    return int(round_to)


def floor_width(channels: int, min_channels: int, min_fraction: float) -> int:
    """The per-node floor of METHOD.md section 3 (at least ``min_channels`` and ``min_fraction``)."""
    return min(channels, max(min_channels, math.ceil(min_fraction * channels)))


@dataclass(frozen=True)
class Goal:
    """What a scorer that decides widths itself must meet (the run's ``allocation`` and
    ``crucial`` settings, handed over explicitly; scorers otherwise see only their own config)."""

    flops_reduction: float = 3.0
    tolerance: float = 0.03
    min_channels: int = 1
    min_fraction: float = 0.05
    round_to: int = 1
    crucial_n: int = 2
    crucial_nodes: tuple[str, ...] | None = None

    @classmethod
    def of(cls, cfg: RunConfig) -> Goal:
        a, c = cfg.allocation, cfg.crucial
        return cls(flops_reduction=a.flops_reduction, tolerance=a.tolerance, min_channels=a.min_channels,
                   min_fraction=a.min_fraction, round_to=resolve_round_to(a.round_to, a.device),
                   crucial_n=c.n,
                   crucial_nodes=tuple(c.nodes) if c.nodes else None)


@dataclass
class Decision:
    """Widths decided by a scorer (RBP): the crucial nodes and each narrowed node's kept count.

    Which channels fill a width is the scorer's scores' choice (highest first), so a decision
    and its scores give one plan. Written into scores.json under ``"decision"``.
    """

    by: str  # the scorer that decided
    crucial: list[str]
    widths: dict[str, int]  # narrowed node -> kept channels (nodes kept whole are absent)

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "crucial": list(self.crucial), "widths": dict(self.widths)}

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> Decision:
        if not (isinstance(data, dict) and isinstance(data.get("crucial"), list)
                and isinstance(data.get("widths"), dict)):
            raise ValueError(f"{source}: 'decision' needs a 'crucial' list and a 'widths' object")
        widths = data["widths"]
        bad = [k for k, v in widths.items() if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)]
        if bad:
            raise ValueError(f"{source}: decision.widths must be positive integers, not at {bad[:4]}")
        return cls(by=str(data.get("by", "?")), crucial=[str(x) for x in data["crucial"]],
                   widths={str(k): int(v) for k, v in widths.items()})

    def check(self, nodes: list[Node], *, source: str = "decision") -> None:
        """Refuse a decision that does not fit these nodes (another model's scores file)."""
        channels = {n.name: n.channels for n in nodes}
        unknown = [k for k in [*self.crucial, *self.widths] if k not in channels]
        if unknown:
            raise ValueError(f"{source}: decision names node(s) {unknown[:4]} this model does not have")
        wide = [k for k, w in self.widths.items() if w > channels[k]]
        if wide:
            raise ValueError(f"{source}: decision keeps more channels than node(s) {wide[:4]} have")

    def counts(self, nodes: list[Node]) -> Mapping[str, int]:
        """Kept channels of every node outside the crucial set."""
        return {n.name: self.widths.get(n.name, n.channels) for n in nodes if n.name not in self.crucial}
