"""Node discovery: the places whose output channels are scored, kept or mimicked.

A *node* (METHOD.md section 1) is one set of coupled output channels: a conv's outputs, or a
residual group whose channels are tied together by adds (all blocks of a ResNet stage), or a
conv coupled with the depthwise conv after it. The coupling comes from torch-pruning's
dependency graph, traced on the real model, so residual, concat and depthwise nets all work.

For each node we record where the importance gate goes (the BatchNorm after every conv that
produces the node's channels), and where its feature map is read for mimicking: the BN output
(ReLU applied by the loss) for a plain conv node, or the last residual junction (a block's
post-activation output) for a residual node, e.g. torchvision ResNet-50 ``layer2.3`` (res3d).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

log = logging.getLogger(__name__)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Node:
    """One prunable (or crucial) channel set of a network."""

    name: str  # conv name, or the last junction's name for residual nodes
    root: str  # conv whose output pruning rebuilds the whole coupled group
    producers: tuple[str, ...]  # convs (incl. depthwise) whose outputs are these channels
    gates: tuple[str, ...]  # modules whose outputs the beta gate multiplies
    capture: str  # module whose output is this node's feature map
    capture_relu: bool  # the capture is pre-activation (BN output): apply ReLU to mimic
    channels: int
    order: int  # position of the capture in execution order
    junctions: tuple[str, ...] = ()
    prunable: bool = True  # False when its channel groups cannot be kept consistently
    # > 1 when tied to a grouped (non-depthwise) conv with this many groups: the node's channels
    # are ``groups`` equal blocks, and a cut keeps the same positions in every block (the group
    # count stays, each group gets narrower), as torch-pruning's grouped-conv pruning does
    groups: int = 1
    # when a producer's outputs are not the node's channels one-to-one (a concat of two convs,
    # GhostNet's primary + cheap op, MixNet's split kernels): per producer (and its gate), the node
    # channel each of its output channels belongs to (-1: none); empty when all are one-to-one
    maps: tuple[tuple[int, ...], ...] = ()
    whole: str = ""  # why a non-prunable node is kept whole ("channels ..."), when not grouped convs

    @property
    def is_junction(self) -> bool:
        return bool(self.junctions)


class UnsupportedModel(ValueError):
    """A model that cannot be channel-pruned; the message is one line naming the cause."""


def refuse_unsupported(model: nn.Module) -> None:
    """One line naming why ``model`` cannot be channel-pruned here (attention ties channels to
    heads; a conv1d across the channel axis ties each channel to its neighbours)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1:
            raise UnsupportedModel(
                f"cannot prune {type(model).__name__}: {name} is a 1-channel Conv1d run across the "
                "channel axis (ECA channel attention: a view folds the channels into its length), which "
                "ties each channel to its neighbours in a way the channel-dependency tracer cannot map")
        if isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith(("Attention", "SelfAttention")):
            raise UnsupportedModel(
                f"cannot prune {type(model).__name__}: it is a transformer ({type(m).__name__} at "
                f"{name or 'the top'} ties channels to attention heads and token embeddings); only "
                "convolutional networks are supported")


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` traced on ``example``."""
    refuse_unsupported(model)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except ZeroDivisionError as e:  # torch-pruning's reshape index mapping
        shuffles = [n for n, m in model.named_modules() if n and "shuffle" in type(m).__name__.lower()
                    or n and "InvertedResidual" in type(m).__name__]
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: a reshape moves channels between groups (channel "
            f"shuffle: view -> transpose -> view{', e.g. in ' + shuffles[0] if shuffles else ''}), which "
            f"ties every branch's channels to the other's through a permutation that the dependency "
            f"tracer cannot map ({e})") from e
    except Exception as e:  # tracing failures come from deep inside torch-pruning
        raise UnsupportedModel(
            f"cannot trace the channel dependencies of {type(model).__name__} "
            f"({type(e).__name__}: {e}); this architecture is not supported for pruning"
        ) from e


# torch-pruning grows a dependency group to a fixed point by mapping channel indices through every
# op. A few patterns make that blow up instead of converging: a view that folds the channel axis
# into another one (ECA's conv1d across channels: C channels -> C*C indices), or a residual add on
# a slice of the channels next to a concat (ReXNet's x[:, :C] + shortcut: the group keeps
# re-adding partial index sets). Bounded, they become a one-line refusal in seconds, not a hang.
MAX_GROUP_INDICES = 500_000  # channel indices summed over one group's entries (VGG's flatten at 224: 75k)
MIN_GROUP_ENTRIES = 2_000  # entries in one group: at least this, or 4 per traced op


class _GroupTooLarge(Exception):
    def __init__(self, op: str, near: str | None, indices: bool) -> None:
        super().__init__(op, near, indices)
        self.op, self.near, self.indices = op, near, indices


_OP_WORDS = {"_ReshapeOp": "a reshape/view", "_SliceOp": "a channel slice", "_ConcatOp": "a concat",
             "_SplitOp": "a split", "_ExpandOp": "an expand", "_ElementWiseOp": "an element-wise op"}


@contextlib.contextmanager
def _bounded_groups(dg: tp.DependencyGraph, names: dict[nn.Module, str]):
    """While inside, every dependency group torch-pruning builds raises :class:`_GroupTooLarge`
    past :data:`MAX_GROUP_INDICES` indices or its entry limit, naming the op that grew it and
    the last model module seen before it."""
    from torch_pruning.dependency import graph as tp_graph

    base = tp_graph.Group
    max_entries = max(MIN_GROUP_ENTRIES, 4 * len(dg.module2node))

    class Bounded(base):
        def add_dep(self, dep, idxs):
            super().add_dep(dep, idxs)
            self._n_idx = getattr(self, "_n_idx", 0) + len(idxs)
            module = dep.target.module
            if module in names:
                self._near = names[module]
            if self._n_idx > MAX_GROUP_INDICES or len(self._group) > max_entries:
                raise _GroupTooLarge(_OP_WORDS.get(type(module).__name__, type(module).__name__),
                                     getattr(self, "_near", None), self._n_idx > MAX_GROUP_INDICES)

    tp_graph.Group = Bounded
    try:
        yield
    finally:
        tp_graph.Group = base


def _group_refusal(model: nn.Module, e: _GroupTooLarge) -> UnsupportedModel:
    why = (f"its channel indices multiply past {MAX_GROUP_INDICES:,}: a view folds the channel axis into "
           "another one, as ECA's conv1d across channels does" if e.indices else
           "it keeps re-adding partial channel sets: an add on a slice of the channels next to a "
           "concat, as ReXNet's x[:, :C] + shortcut")
    return UnsupportedModel(
        f"cannot prune {type(model).__name__}: the coupled channels through {e.op}"
        f"{' after ' + e.near if e.near else ''} do not resolve ({why}); this architecture is not "
        "supported for pruning")


def pruning_group(dg: tp.DependencyGraph, model: nn.Module, root: nn.Module, idxs: list[int]):
    """torch-pruning's group for cutting ``idxs`` of ``root``'s outputs, bounded as in discovery."""
    names = {m: n for n, m in model.named_modules()}
    pruner = dg.get_pruner_of_module(root)
    try:
        with _bounded_groups(dg, names):
            return dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
    except _GroupTooLarge as e:
        raise _group_refusal(model, e) from None


def _exec_order(model: nn.Module, example: torch.Tensor,
                in_dims: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Module name -> index of its forward *completion*, and -> its output channel count;
    ``in_dims`` (if given) receives each module's first input's number of dimensions."""
    order: dict[str, int] = {}
    chans: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        def hook(mod, inp, out, name=name):
            if name not in order:
                order[name] = len(order)
                if isinstance(out, torch.Tensor) and out.dim() >= 2:
                    chans[name] = out.shape[1]
                if in_dims is not None and inp and isinstance(inp[0], torch.Tensor):
                    in_dims[name] = inp[0].dim()
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return order, chans


def _is_grouped(m) -> bool:
    """A grouped conv that is not depthwise: cutting channels would break its group structure."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels)


def _following_bn(dg: tp.DependencyGraph, conv: nn.Module) -> nn.Module | None:
    for out in dg.module2node[conv].outputs:
        if isinstance(out.module, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            return out.module
    return None


def _junction(name: str, modules: dict[str, nn.Module], chans: dict[str, int], width: int) -> str | None:
    """First non-container ancestor of ``name`` whose output has ``width`` channels."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if isinstance(modules[anc], _CONTAINERS):
            continue
        return anc if chans.get(anc) == width else None
    return None


def discover(model: nn.Module, example: torch.Tensor, *, dg: tp.DependencyGraph | None = None) -> list[Node]:
    """All nodes of ``model``, in execution order of their feature maps."""
    was_training = model.training
    model.eval()
    dg = dg or build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    in_dims: dict[str, int] = {}
    order, chans = _exec_order(model, example, in_dims)
    _refuse_train_only(model, example, order)
    # Linears on flattened (B, F) features are classifier heads: never pruned. Linears on
    # (B, H, W, C) maps are 1x1 convs written channels-last (ConvNeXt's MLP): they produce nodes.
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and in_dims.get(names[m], 2) <= 2]
    nodes = []
    try:
        with _bounded_groups(dg, names):
            groups = list(dg.get_all_groups(ignored_layers=heads, root_module_types=(nn.Conv2d, nn.Linear)))
    except _GroupTooLarge as e:
        raise _group_refusal(model, e) from None
    for group in groups:
        convs = [dep.target.module for dep, _ in group
                 if isinstance(dep.target.module, nn.Conv2d | nn.Linear)
                 and dg.is_out_channel_pruning_fn(dep.handler)]
        convs = sorted(set(convs), key=lambda m: order.get(names[m], 1 << 30))
        if not convs:
            continue
        node = _make_node(dg, convs, names, modules, order, chans)
        if any(_out_width(c) != node.channels for c in convs):
            node = _with_maps(dg, model, node, convs, names)
        tied = {dep.target.module.groups for dep, _ in group if _is_grouped(dep.target.module)}
        if tied:
            g = math.lcm(*tied)
            node = dataclasses.replace(node, groups=g, prunable=node.channels % g == 0 and g < node.channels)
        if any(type(dep.target.module).__name__ == "_SplitOp" for dep, _ in group):
            # torch.split(x, sizes, dim=1) keeps its sizes in Python (MixNet's mixed kernels,
            # Res2Net's scales): a cut would leave them summing to the old width
            node = dataclasses.replace(node, prunable=False, whole=(
                "channels pass through a torch.split with fixed sizes, which a cut cannot update"))
        nodes.append(node)
    model.train(was_training)
    if not nodes:
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: no prunable channels found (no Conv2d, nor a Linear "
            "on (B, H, W, C) maps, whose output channels are not tied to the classifier)")
    nodes.sort(key=lambda n: n.order)
    return nodes


def _refuse_train_only(model: nn.Module, example: torch.Tensor, order: dict[str, int]) -> None:
    """One line when modules run in train mode only (auxiliary heads): the graph is traced in
    eval mode, so their inputs would not be cut and recovery (train mode) would fail."""
    idle = [n for n, m in model.named_modules() if n not in order and next(m.parameters(False), None) is not None]
    if not idle:
        return
    probe = copy.deepcopy(model).train()
    seen: set[str] = set()
    hooks = [m.register_forward_hook(lambda *a, n=n: seen.add(n))  # returns None: output unchanged
             for n, m in probe.named_modules() if n in set(idle)]
    try:
        with torch.no_grad():
            probe(torch.cat([example, example]))  # batch 2: BatchNorm needs > 1 value in train mode
    except Exception as e:  # noqa: BLE001  (the modules seen before the failure still count)
        log.debug("train-mode probe of %s failed: %s", type(model).__name__, e)
    finally:
        for h in hooks:
            h.remove()
    train_only = sorted({n.split(".")[0] for n in seen})
    if train_only:
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: modules {', '.join(train_only)} run only in train "
            "mode (auxiliary heads), so channels cut from the layers feeding them would break "
            "training; build the model without them (torchvision: model.kwargs.aux_logits=false)")


def _out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _with_maps(dg, model: nn.Module, node: Node, convs: list[nn.Module], names) -> Node:
    """``node`` with its root's channels as the node's, and each producer's output channels
    mapped onto them through torch-pruning's index mapping (concat, split, depthwise)."""
    modules = dict(model.named_modules())
    root = modules[node.root]
    width = _out_width(root)
    group = pruning_group(dg, model, root, list(range(width)))
    maps = {c: [-1] * _out_width(c) for c in convs}
    for item in group:
        m = item.dep.target.module
        if m in maps and dg.is_out_channel_pruning_fn(item.dep.handler):
            for i, r in zip(item.idxs, item.root_idxs):
                if 0 <= i < len(maps[m]) and r is not None:
                    maps[m][i] = int(r)
    return dataclasses.replace(node, channels=width, maps=tuple(tuple(maps[c]) for c in convs))


def _make_node(dg, convs, names, modules, order, chans) -> Node:
    plain = [c for c in convs if getattr(c, "groups", 1) == 1 or c.groups != c.out_channels]
    root = names[(plain or convs)[0]]
    gates = tuple(names[_following_bn(dg, c) or c] for c in convs)
    width = convs[0].out_channels if isinstance(convs[0], nn.Conv2d) else convs[0].out_features
    producers = tuple(names[c] for c in convs)
    junctions: tuple[str, ...] = ()
    if len(plain) > 1:  # channels tied by residual adds: read them at the block outputs
        found = {_junction(p, modules, chans, width) for p in producers} - {None}
        junctions = tuple(sorted(found, key=lambda n: order[n]))
    if junctions:
        capture, relu, name = junctions[-1], False, junctions[-1]
    else:
        capture, relu, name = gates[-1], True, root
    return Node(name=name, root=root, producers=producers, gates=gates, capture=capture,
                capture_relu=relu, channels=width, order=order[capture], junctions=junctions)


def kept_whole(nodes: list[Node]) -> str:
    """'K of N nodes are kept whole: why (e.g. NAME)', one clause per cause; '' when none are."""
    fixed = [n for n in nodes if not n.prunable]
    if not fixed:
        return ""
    causes: dict[str, list[Node]] = {}
    for n in fixed:
        why = n.whole or "channels are tied to grouped convolutions whose groups do not divide them"
        causes.setdefault(why, []).append(n)
    parts = [f"{len(ns)} whose {why} (e.g. {ns[0].name})" for why, ns in causes.items()]
    return f"{len(fixed)} of {len(nodes)} nodes are kept whole: " + "; ".join(parts)


def stage_of(model: nn.Module, nodes: list[Node], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Node name -> the spatial size of its feature map: nodes of one resolution share a stage."""
    modules = dict(model.named_modules())
    sizes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def fn(mod, inp, out) -> None:
            sizes.setdefault(name, tuple(out.shape[2:]))

        return fn

    hooks = [modules[n.capture].register_forward_hook(hook(n.name)) for n in nodes]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def last_node(nodes: list[Node]) -> Node:
    """The last conv node: the one feeding the classifier."""
    return max(nodes, key=lambda n: n.order)
