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

import contextlib
import logging
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from deploy_prune.nodes import (
    Node,
    UnsupportedModel,
    build_graph,
    discover,
    global_context_blocks,
    is_grouped,
    mixed_conv_splits,
    pruning_group,
)

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


def apply_plan(model: nn.Module, plan: Mapping[str, Sequence[int]], example: torch.Tensor,
               *, nodes: list[Node] | None = None) -> nn.Module:
    """Cut ``model`` in place so each node keeps only ``plan[node]``; returns ``model``.

    ``nodes``: the nodes ``discover`` found on this architecture (on ``model`` or an uncut copy
    of it), to skip discovering them again: an allocation cuts many copies of one model, and
    finding the nodes of a concat-heavy net (DenseNet) took most of its time."""
    was_training = model.training
    model.eval()
    dg = build_graph(model, example)
    nodes = nodes if nodes is not None else discover(model, example, dg=dg)
    validate_plan(plan, nodes)
    modules = dict(model.named_modules())
    mixed = mixed_conv_splits(dg, model)
    context = _context_attention(model)
    for node in nodes:
        kept = set(plan.get(node.name, range(node.channels)))
        drop = [i for i in range(node.channels) if i not in kept]
        if not drop:
            continue
        group = pruning_group(dg, model, modules[node.root], drop)
        if node.tie:
            _cut_grouped_inputs(group, dg)
        extra = _extra_out_params(dg, group)
        attn = _cut_context_attention(group, dg, context) if context else []
        norms = {it.dep.target.module: it.dep.target.module.num_channels // it.dep.target.module.num_groups
                 for it in group if isinstance(it.dep.target.module, nn.GroupNorm)}
        group.prune(record_history=False)
        for norm, width in norms.items():  # torch-pruning narrows a GroupNorm but keeps its group count;
            norm.num_groups = max(1, norm.num_channels // width)  # the node lost whole groups (nodes._tie_group_norms)
        for conv, idxs in attn:
            tp.prune_conv_in_channels(conv, idxs)
        _fit_mixed_convs(mixed)
        for param, n_out, idxs in extra:  # e.g. timm's ScaledStdConv2d gain, (C_out, 1, 1, 1)
            keep = torch.tensor([i for i in range(n_out) if i not in set(idxs)], dtype=torch.long)
            param.data = param.data.index_select(0, keep)
    _fit_channel_buffers(model, example)
    _check_cut(model, example, plan)
    model.train(was_training)
    return model


def _fit_mixed_convs(mixed: Mapping[nn.Module, nn.Module]) -> None:
    """MixNet's MixedConv2d splits its input by sizes kept in Python (``splits``): set them, and
    its channel counts, from its pieces' convs after a cut (each piece lost the channels of the
    node that fell in it; ``nodes._mixed_blocks`` keeps every piece non-empty). torch-pruning's
    split op keeps the offsets it maps indices by from the trace (its pruner updates only the
    sizes), so they are set too: the next node's cut maps through the new pieces."""
    for op, m in mixed.items():
        m.splits = [c.in_channels for c in m.values()]
        m.in_channels, m.out_channels = sum(m.splits), sum(c.out_channels for c in m.values())
        op.split_sizes = list(m.splits)
        op.offsets = [sum(m.splits[:i]) for i in range(len(m.splits) + 1)]


def _context_attention(model: nn.Module) -> dict[nn.Module, nn.Conv2d]:
    """The first mlp layer of each GlobalContext block -> the block's attention conv (found once
    per cut, not once per node)."""
    return {mlp.fc1: gc.conv_attn for gc in global_context_blocks(model)
            for mlp in (gc.mlp_scale, gc.mlp_add) if mlp is not None}


def _cut_context_attention(group, dg, first: Mapping[nn.Module, nn.Conv2d]) -> list[tuple[nn.Conv2d, list[int]]]:
    """(conv_attn, input channels to cut) of the GlobalContext blocks this group narrows: the
    tracer saw them pool by a plain mean (nodes.global_context_blocks), so their attention conv
    is not in the graph; its inputs are the block's, which are the mlp's first layer's
    (``first``: :func:`_context_attention`)."""
    out = {}
    for item in group:
        conv = first.get(item.dep.target.module)
        if conv is not None and not dg.is_out_channel_pruning_fn(item.dep.handler):
            out[conv] = list(item.idxs)
    return list(out.items())


def _extra_out_params(dg, group) -> list[tuple[nn.Parameter, int, list[int]]]:
    """Per-output-channel parameters of Conv2d subclasses that torch-pruning does not know
    (beyond weight and bias): (parameter, output channels before the cut, indices cut)."""
    out = []
    for item in group:
        m = item.dep.target.module
        if type(m) is nn.Conv2d or not isinstance(m, nn.Conv2d) or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        for name, param in m.named_parameters(recurse=False):
            if name not in ("weight", "bias") and param.dim() >= 1 and param.shape[0] == m.out_channels:
                out.append((param, m.out_channels, list(item.idxs)))
    return out


def _channel_buffers(m: nn.Module) -> list[str]:
    """The per-channel buffers of a parameter-free module that records its channel count
    (``m.channels``), when every channel's row is the same: timm's BlurPool2d (anti-aliased
    downsampling, ``resnetblur``), a fixed binomial filter per channel run as a depthwise conv."""
    c = getattr(m, "channels", None)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1 or next(m.parameters(False), None) is not None:
        return []
    bufs = [(n, b) for n, b in m.named_buffers(recurse=False) if b is not None and b.dim() >= 1 and b.shape[0] == c]
    if not bufs or not all(torch.equal(b, b[:1].expand_as(b)) for _, b in bufs):
        return []
    return [n for n, _ in bufs]


def _fit_channel_buffers(model: nn.Module, example: torch.Tensor) -> None:
    """Narrow the modules of :func:`_channel_buffers` to the channels they now receive: their
    rows are all the same, so which channels were cut does not matter (torch-pruning sees their
    functional conv as an element-wise op and maps the channels through it, one to one)."""
    fit = {m: names for m in model.modules() if (names := _channel_buffers(m))}
    if not fit:
        return

    def pre(m, args) -> None:  # returns None: the input is unchanged
        c = args[0].shape[1] if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1 else None
        if c is not None and c != m.channels:
            for n in fit[m]:
                b = getattr(m, n)
                m._buffers[n] = b[:1].expand(c, *b.shape[1:]).contiguous()
            m.channels = c

    hooks = [m.register_forward_pre_hook(pre) for m in fit]
    try:  # a model that no longer runs is _check_cut's to report, in one line
        with torch.no_grad(), contextlib.suppress(RuntimeError):
            model(example)
    finally:
        for h in hooks:
            h.remove()


def _check_cut(model: nn.Module, example: torch.Tensor, plan: Mapping[str, Sequence[int]]) -> None:
    """The cut model has no empty layer and still runs; otherwise one line naming where (the
    tracer mapped channels through an op it does not model, e.g. a slice of a concat)."""
    name = type(model).__name__
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d | nn.Linear) and isinstance(w, torch.Tensor) and 0 in w.shape[:2]:
            raise UnsupportedModel(
                f"cannot prune {name}: the cut left {n} with no channels ({tuple(w.shape)}): the "
                "channel-dependency tracer mapped channels through an op it does not model (a slice "
                "of a concat, as DPN's dual paths); this architecture is not supported for pruning")
    stack: list[str] = []
    failed: list[str] = []

    def pre(n):
        def hook(*a) -> None:  # returns None: the input is unchanged
            stack.append(n)
        return hook

    def post(n):
        def hook(*a) -> None:  # returns None: the output is unchanged
            if stack and stack[-1] == n:
                stack.pop()
        return hook

    hooks = [h for n, m in model.named_modules() if n
             for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    slices = _ChannelSlices(stack)
    try:
        with torch.no_grad(), slices:
            model(example)
    except RuntimeError as e:
        failed = stack[-1:]
        at = f" at {failed[0]}" if failed else ""
        cut = slices.seen.get(failed[0]) if failed else None
        if cut:  # ReXNet: cat([x[:, :self.in_channels] + shortcut, x[:, self.in_channels:]])
            raise UnsupportedModel(
                f"cannot prune {name}: after the cut it no longer runs{at}, which slices its channels at a "
                f"fixed index ({cut}: a partial residual, as ReXNet's x[:, :C] + shortcut, ties the first C "
                "channels to the block input, and the cut cannot update the index); this architecture is "
                "not supported for pruning") from None
        raise UnsupportedModel(
            f"cannot prune {name}: after the cut it no longer runs{at} "
            f"({str(e).splitlines()[0][:160]}): a module keeps channel counts that the cut cannot "
            "update; this architecture is not supported for pruning") from None
    finally:
        for h in hooks:
            h.remove()


class _ChannelSlices(TorchFunctionMode):
    """Records, per running module (the top of ``stack``), its first slice of a feature map's
    channel axis at a fixed index (``x[:, 0:16]``): a cut model that then fails there failed
    because the index kept the base's width."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.seen = stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and self.stack and len(args) == 2 and isinstance(args[1], tuple):
            x, idx = args
            ch = idx[1] if len(idx) > 1 and idx[0] == slice(None) else None
            if (isinstance(ch, slice) and isinstance(x, torch.Tensor) and x.dim() == 4
                    and (ch.start, ch.stop) != (None, None) and ch.step in (None, 1)):
                self.seen.setdefault(self.stack[-1], f"x[:, {ch.start or ''}:{ch.stop or ''}] on "
                                     f"a map of {x.shape[1]} channels")
        return out


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
