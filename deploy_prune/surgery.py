"""Surgery: physically cut channels out of a network (METHOD.md section 4).

The producing convs' filters and biases, the BatchNorm entries and every consumer's input
channels (convs, grouped/depthwise convs, linears after a flatten) are removed through
torch-pruning's dependency graph. A grouped conv whose nodes are tied (``Node.tie``) loses
whole groups instead: its input blocks go with the feeding node's cut, its filters with the
produced node's, and its group count drops. The result is an ordinary, smaller ``nn.Module``: no masks,
no hooks, no zero channels. A *plan* (node name -> kept channel indices of the base model) is
all that is needed to redo the cut on a freshly built base model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from deploy_prune.nodes import Node, build_graph, discover, is_grouped

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
            why = node.fixed or (f"its channels are tied to grouped convolutions with {node.groups} groups "
                                 f"that do not divide its {c} channels")
            raise PlanError(f"node {name!r} cannot be narrowed ({why})")
        if node.tie:
            continue  # checked per tied unit below
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
    _validate_ties(plan, nodes)


def kept_groups(kept: Sequence[int], node: Node) -> list[int] | None:
    """The groups a tied node keeps (block g = channels g*w .. g*w + w - 1), or None when ``kept``
    is not a union of whole blocks."""
    w = node.channels // node.groups
    groups = sorted({i // w for i in kept})
    return groups if sorted(kept) == [g * w + j for g in groups for j in range(w)] else None


def _validate_ties(plan: Mapping[str, Sequence[int]], nodes: list[Node]) -> None:
    """Each tied unit keeps whole groups, the same ones in every node of the unit."""
    units: dict[str, list[Node]] = {}
    for n in nodes:
        if n.tie:
            units.setdefault(n.tie, []).append(n)
    for tie, members in units.items():
        seen = {}
        for n in members:
            kept = kept_groups(plan.get(n.name, range(n.channels)), n)
            if kept is None:
                raise PlanError(f"plan for node {n.name!r}: it is tied to grouped convolutions with "
                                f"{n.groups} groups, so it keeps whole blocks of {n.channels // n.groups} "
                                "channels (whole groups)")
            seen[n.name] = kept
        if len({tuple(g) for g in seen.values()}) > 1:
            raise PlanError(f"plan for the nodes tied at {tie!r} ({', '.join(seen)}): they feed and leave "
                            "the same grouped convolutions, so they must keep the same groups (got "
                            + "; ".join(f"{k}: {len(v)} groups" for k, v in seen.items()) + ")")


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
        root = modules[node.root]
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, drop)
        if node.tie:
            _cut_grouped_inputs(group, dg)
        group.prune(record_history=False)
    model.train(was_training)
    return model


def _cut_grouped_inputs(group, dg) -> None:
    """Remove whole groups from the grouped convs that a tied node feeds, and take those items out
    of torch-pruning's ``group`` (its in-channel rule keeps the same positions in every group).

    Weight (out, in/groups, kh, kw): the input blocks of removed groups are simply gone, the
    per-group width stays, so no weight changes here; the filters of the removed groups go with
    the produced node's cut (its out-channel rows)."""
    keep = []
    for item in group.items:
        conv = item.dep.target.module
        if is_grouped(conv) and not dg.is_out_channel_pruning_fn(item.dep.handler):
            width = conv.in_channels // conv.groups
            gone = sorted({i // width for i in item.idxs})
            assert sorted(item.idxs) == [g * width + j for g in gone for j in range(width)], "not whole groups"
            conv.groups -= len(gone)
            conv.in_channels -= len(gone) * width
            continue
        keep.append(item)
    group._group[:] = keep


def widths(nodes: list[Node], plan: Mapping[str, Sequence[int]] | None = None) -> dict[str, int]:
    """Node name -> kept channel count (base width where the plan is silent)."""
    plan = plan or {}
    return {n.name: len(plan[n.name]) if n.name in plan else n.channels for n in nodes}
