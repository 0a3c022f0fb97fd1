"""Surgery: physically cut channels out of a network (METHOD.md section 4).

The producing convs' filters and biases, the BatchNorm entries and every consumer's input
channels (convs, grouped/depthwise convs, linears after a flatten) are removed through
torch-pruning's dependency graph. The result is an ordinary, smaller ``nn.Module``: no masks,
no hooks, no zero channels. A *plan* (node name -> kept channel indices of the base model) is
all that is needed to redo the cut on a freshly built base model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from deploy_prune.nodes import Node, build_graph, discover, pruning_group

log = logging.getLogger(__name__)

Plan = dict[str, list[int]]  # node name -> sorted kept channel indices (base numbering)


class PlanError(ValueError):
    """A plan does not fit the model it is applied to."""


def validate_plan(plan: Mapping[str, Sequence[int]], nodes: list[Node]) -> None:
    """Every node named exists, and its kept indices are unique, in range and non-empty."""
    known = {n.name: n for n in nodes}
    for name, kept in plan.items():
        if name not in known:
            raise PlanError(f"plan names node {name!r}, which this model does not have "
                            f"(nodes: {', '.join(list(known)[:8])}, ...)")
        c = known[name].channels
        node = known[name]
        if not node.prunable and len(kept) != c:
            why = f"its {node.whole}" if node.whole else (f"its channels are tied to grouped convolutions with {node.groups} "
                                 f"groups that do not divide its {c} channels")
            raise PlanError(f"node {name!r} cannot be narrowed ({why})")
        if node.groups > 1 and len(kept) != c:
            width = c // node.groups
            blocks = [sorted(i - b * width for i in kept if b * width <= i < (b + 1) * width)
                      for b in range(node.groups)]
            if any(blk != blocks[0] for blk in blocks):
                raise PlanError(f"plan for node {name!r}: it feeds a grouped convolution with "
                                f"{node.groups} groups, so every group must keep the same positions "
                                f"(channel i and i + {width}*g together)")
        if not kept:
            raise PlanError(f"plan keeps no channel of node {name!r}; at least one is needed")
        if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= c:
            raise PlanError(f"plan for node {name!r}: kept indices must be unique and in [0, {c})")


def apply_plan(model: nn.Module, plan: Mapping[str, Sequence[int]], example: torch.Tensor) -> nn.Module:
    """Cut ``model`` in place so each node keeps only ``plan[node]``; returns ``model``."""
    was_training = model.training
    model.eval()
    dg = build_graph(model, example)
    nodes = discover(model, example, dg=dg)
    validate_plan(plan, nodes)
    modules = dict(model.named_modules())
    for node in nodes:
        kept = set(plan.get(node.name, range(node.channels)))
        drop = [i for i in range(node.channels) if i not in kept]
        if not drop:
            continue
        pruning_group(dg, model, modules[node.root], drop).prune(record_history=False)
    model.train(was_training)
    return model


def widths(nodes: list[Node], plan: Mapping[str, Sequence[int]] | None = None) -> dict[str, int]:
    """Node name -> kept channel count (base width where the plan is silent)."""
    plan = plan or {}
    return {n.name: len(plan[n.name]) if n.name in plan else n.channels for n in nodes}
