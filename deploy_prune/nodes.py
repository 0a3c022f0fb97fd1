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
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

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
    # are ``groups`` equal blocks. With ``tie`` set, a cut removes whole blocks, together with
    # the same blocks of every node sharing the tie (the conv loses whole groups: fewer groups,
    # same width per group). Without it (the blocks do not line up, see ``_tie_groups``), a cut
    # keeps the same positions in every block (the group count stays, each group narrows).
    groups: int = 1
    tie: str = ""  # the unit of nodes that lose the same whole groups (its first node's name)
    fixed: str = ""  # why the node is kept whole (prunable False), one line
    # when a producer's outputs are not the node's channels one-to-one (a concat of two convs,
    # GhostNet's primary + cheap op, MixNet's split kernels): per producer (and its gate), the node
    # channel each of its output channels belongs to (-1: none); empty when all are one-to-one
    maps: tuple[tuple[int, ...], ...] = ()
    # hidden units of an MLP head (a Linear on flattened (B, F) features feeding another Linear,
    # as VGG's and AlexNet's 4096-wide classifier layers): prunable, but with no spatial map they
    # are never crucial and never mimicked, and "the last node" means the last conv node
    flat: bool = False

    @property
    def is_junction(self) -> bool:
        return bool(self.junctions)


class UnsupportedModel(ValueError):
    """A model that cannot be channel-pruned; the message is one line naming the cause."""


def _is_attention(m: nn.Module) -> bool:
    """Token attention (MultiheadAttention, Swin's ShiftedWindowAttention[V2], MaxViT's ...Attention);
    not the channel/spatial gates some CNNs name ChannelAttention or SpatialAttention (CBAM)."""
    name = type(m).__name__
    return isinstance(m, nn.MultiheadAttention) or (
        re.search(r"Attention(V\d+)?$", name) is not None and not name.startswith(("Channel", "Spatial")))


def refuse_unsupported(model: nn.Module) -> None:
    """One line naming why ``model`` cannot be channel-pruned here (attention ties channels to
    heads; a conv1d across the channel axis ties each channel to its neighbours)."""
    in_eca = {c for b in eca_blocks(model) for c in b.modules()}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1 and m not in in_eca:
            raise UnsupportedModel(
                f"cannot prune {type(model).__name__}: {name} is a 1-channel Conv1d run across the "
                "channel axis (ECA channel attention: a view folds the channels into its length), which "
                "ties each channel to its neighbours in a way the channel-dependency tracer cannot map")
        if _is_attention(m):
            raise UnsupportedModel(
                f"cannot prune {type(model).__name__}: it is a transformer ({type(m).__name__} at "
                f"{name or 'the top'} ties channels to attention heads and token embeddings); only "
                "convolutional networks are supported")


class _ChannelMoves(TorchFunctionMode):
    """Records, during the trace, every view/reshape that moves channels between positions (a
    channel shuffle's view (B, C, H, W) -> (B, g, C/g, H, W) and back): output grad_fn -> what
    it did and in which module. Flattening (B, C, H, W) -> (B, CHW), reshapes that keep (B, C)
    and reshapes of parameters (weight standardisation) are left to torch-pruning."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.moves: dict = {}  # grad_fn -> "view (1, 48, 8, 8) -> (1, 2, 24, 8, 8) in stage2.0"
        # grad_fn of a channel concat of feature maps -> its inputs' channel counts, as they ran
        # (torch-pruning infers them from the graph and fails when an input comes from a split:
        # CSPNet's cross-stage blocks, "unsupported operand type(s) for +: 'int' and 'NoneType'")
        self.cat_sizes: dict = {}
        # feature maps: tensors computed from the input (not from weights alone, as in weight
        # standardisation); by id, with the tensors held so that no id is reused during the trace
        self._maps: dict[int, torch.Tensor] = {id(example): example}
        self._stack: list[str] = []
        self._hooks = []
        for name, m in model.named_modules():
            self._hooks += [m.register_forward_pre_hook(lambda *a, n=name: self._enter(n)),
                            m.register_forward_hook(self._leave)]

    def _enter(self, name: str) -> None:
        if not name:  # a new forward of the whole model (an earlier one may have failed midway)
            self._stack.clear()
        self._stack.append(name)

    def _leave(self, *args) -> None:
        self._stack.pop()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(id(t) in self._maps for t in inputs):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._maps[id(t)] = t
        src = args[0] if args else None
        fn = getattr(out, "grad_fn", None)
        if func in (torch.cat, torch.concat, torch.concatenate) and fn is not None and isinstance(src, list | tuple):
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
            if out.dim() == 4 and dim in (1, -3):
                self.cat_sizes[fn] = [int(t.shape[1]) for t in src]
        if (isinstance(src, torch.Tensor) and id(src) in self._maps and isinstance(out, torch.Tensor)
                and fn is not None and any(k in fn.name().lower() for k in ("view", "reshape"))
                and _moves_channels(src.shape, out.shape)):
            where = next((n for n in reversed(self._stack) if n), "the top module")
            self.moves[fn] = f"{getattr(func, '__name__', 'reshape')} {tuple(src.shape)} -> {tuple(out.shape)} in {where}"
        return out


def _moves_channels(src: torch.Size, out: torch.Size) -> bool:
    """A reshape of a (B, C, H, W) map (or of a 5-D one back) that neither keeps (B, C) nor
    flattens it to (B, C*H*W). 3-D reshapes (ECA's (B, 1, C) attention, weight standardisation)
    are left to torch-pruning as before."""
    if len(src) < 4 or src == out or tuple(out[:2]) == tuple(src[:2]):
        return False
    return not (len(out) == 2 and out[1] == math.prod(src[1:]))


class _Graph(tp.DependencyGraph):
    """torch-pruning's graph, with reshapes that move channels made opaque: a dependency group
    that reaches one stops there (nothing is mapped through it), and ``discover`` keeps every
    node whose group reaches one whole (``Node.fixed``). The channels after it are then never
    cut either: only a group coming through it could cut them."""

    def __init__(self, moves: dict, cat_sizes: dict | None = None) -> None:
        super().__init__()
        self.moves, self.opaque = moves, {}  # opaque: tp node -> what the reshape did
        self.cat_sizes = cat_sizes if cat_sizes is not None else {}  # filled during the trace

    def _trace(self, *args, **kwargs):
        module2node = super()._trace(*args, **kwargs)
        for op, node in list(module2node.items()):
            if node.type == tp.ops.OPTYPE.CONCAT and node.grad_fn in self.cat_sizes:
                sizes = self.cat_sizes[node.grad_fn]
                if len(sizes) == len(node.inputs):  # the traced inputs are the concat's, in order
                    node.module.concat_sizes = sizes
            if node.type == tp.ops.OPTYPE.RESHAPE and node.grad_fn in self.moves:
                node.module = tp.ops._ElementWiseOp(op.id, "ChannelMove")
                node.type, node.module_class = tp.ops.OPTYPE.ELEMENTWISE, type(node.module)
                module2node[node.module] = module2node.pop(op)
                self.opaque[node] = self.moves[node.grad_fn]
        return module2node

    def _build_dependency(self, module2node) -> None:
        super()._build_dependency(module2node)
        for node in self.opaque:
            node.dependencies = []  # no rule leads through it


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` traced on ``example``, with the reshapes that
    move channels opaque (torch-pruning maps a channel shuffle wrongly, or fails on it)."""
    refuse_unsupported(model)
    try:
        with torch.enable_grad(), _traced_channelwise(model), _ChannelMoves(model, example) as moves:
            dg = _Graph(moves.moves, moves.cat_sizes).build_dependency(model, example_inputs=example, verbose=False)
        mixed_conv_splits(dg, model)  # (puts the splits' outputs in piece order)
        return dg
    except ZeroDivisionError as e:  # torch-pruning's reshape index mapping
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: a reshape maps channels in a way the dependency tracer "
            f"cannot follow ({e})") from e
    except Exception as e:  # tracing failures come from deep inside torch-pruning
        _check_runs(model, example)
        raise _untraceable(model, e) from e


def global_context_blocks(model: nn.Module) -> list[nn.Module]:
    """timm's GlobalContext blocks (GCNet, ``gcresnet*``) that pool by a learned spatial attention:
    ``conv_attn`` (C -> 1) weighs the positions, and the context (B, C, 1, 1) is the flattened map
    times those weights (a matmul). Channel for channel it is a weighted mean, but torch-pruning
    maps the channels of the (B, 1, C, HW) @ (B, 1, HW, 1) matmul onto the attention map's single
    channel, and its index groups never converge."""
    return [m for m in model.modules() if type(m).__name__ == "GlobalContext"
            and isinstance(getattr(m, "conv_attn", None), nn.Conv2d)]


def _mean_context_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GlobalContext.forward as the tracer sees it: the attention-weighted context replaced by the
    plain mean, which couples the channels the same way (each context channel from its own map
    channel). ``conv_attn`` then stays out of the graph: surgery cuts its inputs with the
    mlp's (``surgery._cut_context_attention``)."""
    context = x.mean((2, 3), keepdim=True)
    if self.mlp_scale is not None:
        x = x * self.gate(self.mlp_scale(context))
    if self.mlp_add is not None:
        x = x + self.mlp_add(context)
    return x


def eca_blocks(model: nn.Module) -> list[nn.Module]:
    """timm's ECA channel attention (``EcaModule``, and ``CecaModule`` with circular padding;
    ``ecaresnet*``): the pooled (B, C) map is viewed as (B, 1, C) and a Conv1d(1, 1, k) slides
    across the channel axis; its sigmoid output gates each channel. The Conv1d holds no parameter
    per channel and runs on any length, so the block changes no channel count: after a cut it
    simply runs over the kept channels. It is traced as the per-channel gate it is
    (:func:`_channel_gate_forward`), so its channels follow the block's and its nodes are prunable.
    The cut is not exact, unlike an SE block's: each kept channel's attention weight mixes its
    k neighbours along the channel axis, and the neighbours change when channels between them
    go (and the zero / circular padding now meets other channels at the ends). Recovery
    (fine-tuning) absorbs this, as it does the loss of the cut channels themselves."""
    return [m for m in model.modules() if type(m).__name__ in ("EcaModule", "CecaModule")
            and isinstance(getattr(m, "conv", None), nn.Conv1d)]


def _channel_gate_forward(self, x: torch.Tensor) -> torch.Tensor:
    """EcaModule/CecaModule.forward as the tracer sees it: the Conv1d across channels left out, so
    each channel is gated by its own pooled value (the coupling an SE block without parameters per
    channel has: the block's channels are the input's, one to one)."""
    return x * self.gate(x.mean((2, 3), keepdim=True))


@contextlib.contextmanager
def _traced_channelwise(model: nn.Module):
    """While inside, the blocks of :func:`global_context_blocks` run :func:`_mean_context_forward`
    and those of :func:`eca_blocks` run :func:`_channel_gate_forward`."""
    import types

    blocks = [(m, _mean_context_forward) for m in global_context_blocks(model)]
    blocks += [(m, _channel_gate_forward) for m in eca_blocks(model)]
    for m, fwd in blocks:
        m.forward = types.MethodType(fwd, m)
    try:
        yield
    finally:
        for m, _ in blocks:
            del m.forward


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """A model that does not run on ``example`` at all: say that (usually the input is too small
    for it, as Inception-v4 at 64x64), not that its graph cannot be traced."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001  (any failure of the user's forward is the one line)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UnsupportedModel(
            f"{type(model).__name__} does not run on an input of shape {tuple(example.shape)} "
            f"({type(e).__name__}: {first}); give it an input size it accepts (the model's "
            "input_size, e.g. --input-size 299 on import)") from None


def _untraceable(model: nn.Module, e: Exception) -> UnsupportedModel:
    return UnsupportedModel(f"cannot trace the channel dependencies of {type(model).__name__} "
                            f"({type(e).__name__}: {e}); this architecture is not supported for pruning")


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


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise: cutting channels would break its group structure."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels)


_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)


def _following_bn(dg: tp.DependencyGraph, conv: nn.Module) -> nn.Module | None:
    """The norm module right after ``conv``, whose output the gate multiplies (a zeroed channel
    is then exactly a cut one); None when there is none."""
    outs = dg.module2node[conv].outputs
    for out in outs:
        if isinstance(out.module, _NORMS):
            return out.module
    # timm's BatchNormAct2d / GroupNormAct call the norm functionally inside the module, whose
    # (hooked) output comes after its activation: conv -> functional norm -> the norm module
    if len(outs) == 1 and type(outs[0].module).__name__ == "_ElementWiseOp" and "Norm" in outs[0].grad_fn.name():
        nxt = outs[0].outputs
        if len(nxt) == 1 and isinstance(nxt[0].module, _NORMS):
            return nxt[0].module
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
    # Linears on flattened (B, F) features: the output layer (its outputs are the classes) is
    # never pruned; a hidden layer of an MLP head (its outputs feed another layer) produces a
    # ``flat`` node. Linears on (B, H, W, C) maps are 1x1 convs written channels-last (ConvNeXt's
    # MLP): they produce nodes.
    flat = {m for m in model.modules() if isinstance(m, nn.Linear) and in_dims.get(names[m], 2) <= 2}
    heads = _output_layers(dg, flat)
    nodes, touches = [], []  # touches[i]: node i's grouped convs
    norms: list[list[tuple[str, nn.GroupNorm, bool]]] = []  # norms[i]: node i's GroupNorms (name, module, aligned)
    mixed = mixed_conv_splits(dg, model)  # torch-pruning's split op -> the MixedConv2d it feeds
    pieces_of = {c: (m, j) for m in set(mixed.values()) for j, c in enumerate(m.values())}
    pieces: list[dict] = []  # pieces[i]: node i's channels per MixedConv2d piece
    try:
        with _bounded_groups(dg, names):
            groups = list(dg.get_all_groups(ignored_layers=heads, root_module_types=(nn.Conv2d, nn.Linear)))
    except _GroupTooLarge as e:
        raise _group_refusal(model, e) from None
    groups = _mixed_groups(groups, dg, model, pieces_of, order, names)
    for group in groups:
        convs = [dep.target.module for dep, _ in group
                 if isinstance(dep.target.module, nn.Conv2d | nn.Linear)
                 and dg.is_out_channel_pruning_fn(dep.handler)]
        convs = sorted(set(convs), key=lambda m: order.get(names[m], 1 << 30))
        if not convs:
            continue
        node = _make_node(dg, convs, names, modules, order, chans)
        if all(c in flat for c in convs):
            node = dataclasses.replace(node, flat=True)
        if any(_out_width(c) != node.channels for c in convs):
            node = _with_maps(dg, model, node, convs, names)
        moved = next((dg.opaque[it.dep.target] for it in group if it.dep.target in dg.opaque), None)
        if moved:
            node = dataclasses.replace(node, prunable=False, fixed=f"its channels pass through a reshape that "
                                       f"moves them between positions (channel shuffle: {moved})")
        elif any(type(m).__name__ == "_SplitOp" and m not in mixed for m in (it.dep.target.module for it in group)):
            # torch.split(x, sizes, dim=1) keeps its sizes in Python (Res2Net's scales, MambaOut's
            # gated conv): a cut would leave them summing to the old width
            node = dataclasses.replace(node, prunable=False, fixed=(
                "its channels pass through a torch.split with fixed sizes, which a cut cannot update"))
        pieces.append(_mixed_pieces(group, pieces_of))
        touches.append([_touch(it, dg.is_out_channel_pruning_fn(it.dep.handler), names, node.channels)
                        for it in group if is_grouped(it.dep.target.module)])
        norms.append([(names[it.dep.target.module], it.dep.target.module,
                       sorted(zip(it.root_idxs, it.idxs)) == [(i, i) for i in range(node.channels)])
                      for it in group if _group_norm_ties(it.dep.target.module)])
        nodes.append(node)
    nodes = _tie_group_norms(_tie_groups(_unique_names(nodes, order), touches), norms)
    nodes = [_mixed_blocks(n, p, names) for n, p in zip(nodes, pieces)]
    model.train(was_training)
    if not nodes:
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: no prunable channels found (no Conv2d, nor a Linear "
            "on (B, H, W, C) maps, whose output channels are not tied to the classifier)")
    nodes.sort(key=lambda n: n.order)
    return nodes


def _output_layers(dg, linears: set[nn.Module]) -> list[nn.Module]:
    """The Linears (of ``linears``) whose outputs reach no other layer: the model's outputs."""
    out = []
    for m in linears:
        group = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0])
        if not any(it.dep.target.module is not m and isinstance(it.dep.target.module, nn.Module)
                   and not dg.is_out_channel_pruning_fn(it.dep.handler)
                   and type(it.dep.target.module).__name__ != "_ElementWiseOp" for it in group):
            out.append(m)
    return out


def _unique_names(nodes: list[Node], order: dict[str, int]) -> list[Node]:
    """Nodes that claim one junction name drop their junctions that enclose another of theirs:
    such a junction is a block output that only happens to have as many channels (RegNet-Y: conv b
    and the SE's fc2 meet at the SE, inside the block whose output is the residual node's)."""
    seen: dict[str, int] = {}
    for n in nodes:
        seen[n.name] = seen.get(n.name, 0) + 1
    out = []
    for n in nodes:
        inner = tuple(j for j in n.junctions if not any(k.startswith(j + ".") for k in n.junctions))
        if seen[n.name] > 1 and inner and inner != n.junctions:
            n = dataclasses.replace(n, name=inner[-1], capture=inner[-1], order=order[inner[-1]], junctions=inner)
        out.append(n)
    return out


@dataclass(frozen=True)
class _Touch:
    """A node's channels entering (``out=False``) or leaving (``out=True``) a grouped conv."""

    conv: str
    module: nn.Conv2d
    out: bool
    aligned: bool  # node channel i is the conv's channel i, all of them: its groups are whole blocks


def _touch(item, out: bool, names: dict[nn.Module, str], width: int) -> _Touch:
    """The grouped conv of a dependency-group item; aligned when the node's channel i is the
    conv's channel i, for all of them."""
    conv = item.dep.target.module
    n = conv.out_channels if out else conv.in_channels
    aligned = n == width and sorted(zip(item.root_idxs, item.idxs)) == [(i, i) for i in range(n)]
    return _Touch(names[conv], conv, out, aligned)


def _tie_groups(nodes: list[Node], touches: list[list[_Touch]]) -> list[Node]:
    """Nodes joined through grouped convs, tied so that they lose whole groups together.

    A grouped conv with G groups computes group g from input block g alone, so removing group g
    removes block g of the node feeding it and block g of the node it produces, and nothing
    else changes (ResNeXt, RegNet: conv1-out with conv2-in, conv2-out with conv3-in). A unit
    (the nodes connected through grouped convs) is tied when all its convs have one group count
    and meet the nodes' channels one to one; otherwise its nodes keep the old rule (the same
    positions in every group, the group count kept) and one line says why."""
    parent = list(range(len(nodes)))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    by_conv: dict[str, list[int]] = {}
    for i, ts in enumerate(touches):
        for t in ts:
            by_conv.setdefault(t.conv, []).append(i)
    for members in by_conv.values():
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    units: dict[int, list[int]] = {}
    for i in range(len(nodes)):
        if touches[i]:
            units.setdefault(find(i), []).append(i)
    out = list(nodes)
    for idx in units.values():
        members = [nodes[i] for i in idx]
        ts = [t for i in idx for t in touches[i]]
        why = _untieable(members, ts)
        if why:
            _warn_once(f"grouped convs not cut by whole groups: nodes {', '.join(n.name for n in members)}: {why}; "
                       "those that meet a conv one to one keep the same positions in every group, the rest are kept whole")
            for i in idx:
                n, g = nodes[i], math.lcm(*{t.module.groups for t in touches[i]})
                bad = next((t.conv for t in touches[i] if not t.aligned), None)
                fixed = f"its channels reach the grouped conv {bad} through a concat, split or reshape" if bad else ""
                out[i] = dataclasses.replace(n, groups=g, fixed=fixed,
                                             prunable=not bad and n.channels % g == 0 and g < n.channels)
            continue
        g, tie = ts[0].module.groups, min(members, key=lambda n: n.order).name
        for i in idx:
            out[i] = dataclasses.replace(nodes[i], groups=g, tie=tie)
    return out


def mixed_convs(model: nn.Module) -> list[nn.Module]:
    """timm's MixedConv2d (MixNet's mixed kernels): ``torch.split(x, self.splits, 1)``, a conv per
    piece (a depthwise conv with its own kernel size, or a 1x1 conv from piece to piece), and a
    concat of their outputs. The split sizes are kept in Python (``splits``), so the cut sets
    them from the pieces' convs (``surgery._fit_mixed_convs``)."""
    return [m for m in model.modules() if type(m).__name__ == "MixedConv2d" and hasattr(m, "splits")
            and all(isinstance(c, nn.Conv2d) for c in m.values())]


def mixed_conv_splits(dg: tp.DependencyGraph, model: nn.Module) -> dict[nn.Module, nn.Module]:
    """torch-pruning's split op -> the :func:`mixed_convs` module whose pieces it feeds (through
    the padding of a 'same'-padded conv at most), for splits of as many pieces as the module has.

    The split's outputs in the graph are put in piece order: torch-pruning maps piece i's
    channels through ``outputs[i]``, but lists the outputs in the order the trace met them
    (mixnet_s: blocks.1.1.conv_pw piece 1 first), and a cut of piece 1 took piece 0's inputs."""
    owner = {c: (m, j) for m in mixed_convs(model) for j, c in enumerate(m.values())}
    out = {}
    for op, node in dg.module2node.items():
        if type(op).__name__ != "_SplitOp":
            continue
        found = []
        for nxt in node.outputs:
            for _ in range(3):  # split -> (pad) -> conv
                if nxt.module in owner or len(nxt.outputs) != 1:
                    break
                nxt = nxt.outputs[0]
            found.append(owner.get(nxt.module, (None, -1)))
        mods, pieces = {m for m, _ in found}, sorted(j for _, j in found)
        if len(mods) == 1 and None not in mods and pieces == list(range(len(next(iter(mods)).splits))):
            node.outputs = [o for _, o in sorted(zip((j for _, j in found), node.outputs), key=lambda t: t[0])]
            out[op] = mods.pop()
    return out


def _plain(c: nn.Module) -> bool:
    return getattr(c, "groups", 1) == 1 or c.groups != c.out_channels


def _mixed_groups(groups: list, dg, model: nn.Module, pieces_of: dict, order: dict[str, int], names) -> list:
    """``groups`` with those that reach a MixedConv2d's pieces replaced by one group per node:
    each rooted at a conv that cuts the node (a non-depthwise producer), over all its channels.
    torch-pruning roots a group at each piece of a depthwise MixedConv2d (3 nodes named alike),
    or at an SE block's expand conv over the pieces of two convs (mixnet_s blocks.2.1: conv_pw.0
    and conv_pw.1 in one group, of which only conv_pw.0's 120 channels became a node)."""
    out, done = [], set()
    for group in groups:
        if not any(it.dep.target.module in pieces_of for it in group):
            out.append(group)
            continue
        convs = sorted({it.dep.target.module for it in group if isinstance(it.dep.target.module, nn.Conv2d | nn.Linear)
                        and dg.is_out_channel_pruning_fn(it.dep.handler)}, key=lambda m: order.get(names[m], 1 << 30))
        for root in [c for c in convs if _plain(c)] or convs[:1]:
            if root in done:
                continue
            full = pruning_group(dg, model, root, list(range(_out_width(root))))
            done |= {it.dep.target.module for it in full if dg.is_out_channel_pruning_fn(it.dep.handler)}
            out.append(full)
    return out


def _mixed_pieces(group, pieces_of: dict) -> dict[nn.Module, dict[int, set[int]]]:
    """For each MixedConv2d a node's group reaches (the inputs of its pieces, or their outputs):
    piece -> the node channels (the group root's numbering, as ``Node.maps``) in that piece."""
    out: dict[nn.Module, dict[int, set[int]]] = {}
    for item in group:
        if item.dep.target.module in pieces_of:
            m, j = pieces_of[item.dep.target.module]
            out.setdefault(m, {}).setdefault(j, set()).update(int(r) for r in item.root_idxs if r is not None)
    return out


# Each MixedConv2d piece keeps a multiple of this many channels where the node's width allows
# (halved until it does). Measured on this repo's AVX-512 CPU (ORT, batch 1, 64x64, 2x fewer
# FLOPs): timm.mixnet_s ran 0.93x its base with pieces cut to any width (71, 122, 153, ...),
# 1.41x with multiples of 8, 1.38x with 16. (allocation.round_to does not reach a node's pieces:
# a node with ``groups`` is rounded to a multiple of its group count.)
MIXED_PIECE_MULTIPLE = 8


def _mixed_blocks(node: Node, pieces: dict[nn.Module, dict[int, set[int]]], names) -> Node:
    """A node whose channels pass through MixedConv2d splits is cut by the same positions in
    equal blocks that line up with every piece it meets: ``groups`` = its width over the gcd of
    the pieces' bounds (3 equal pieces: 3 groups; mixnet_s blocks.4.0, whose 240 channels meet
    depthwise pieces of 160 and 80: 3 groups of 80), untied, so no piece is emptied (a conv of 0
    channels would not run). The groups are then multiplied by up to
    :data:`MIXED_PIECE_MULTIPLE` (blocks of at least 2 channels), so that each piece keeps a
    multiple of it. Kept whole, with one line, when its channels do not fill each piece as one
    run of its numbering, or it is already tied to grouped convs or GroupNorms."""
    if not node.prunable:
        return node
    c, w = node.channels, node.channels
    for m, by_piece in pieces.items():
        runs = sorted((min(s), max(s) + 1, len(s)) for s in by_piece.values())
        if [(a, b) for a, b, _ in runs] != list(zip([0] + [b for _, b, _ in runs[:-1]], [b for _, b, _ in runs])) \
                or runs[-1][1] != c or any(b - a != n for a, b, n in runs):
            return dataclasses.replace(node, prunable=False, fixed=(
                f"its channels reach the pieces of the mixed-kernel conv {names[m]} (a torch.split) through "
                "a concat, split or reshape that does not line them up"))
        w = math.gcd(w, *(a for a, _, _ in runs))
    g = c // w
    if g == 1:
        return node
    if node.groups > 1:
        return dataclasses.replace(node, prunable=False, fixed=(
            f"its channels pass through mixed-kernel convs ({g} blocks) and grouped convs or "
            f"GroupNorms of {node.groups} groups"))
    q = MIXED_PIECE_MULTIPLE
    while q > 1 and (c % (g * q) or c // (g * q) < 2):
        q //= 2
    return dataclasses.replace(node, groups=g * q)


def _group_norm_ties(m: nn.Module) -> bool:
    """A GroupNorm whose groups span several channels but not all (ResNet-50-GN: 32 groups): the
    channels it normalises together must go together (1 group is LayerNorm-like, one channel a
    group is InstanceNorm-like: neither ties channels, the cut only narrows them)."""
    return isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels


def _tie_group_norms(nodes: list[Node], norms: list[list[tuple[str, nn.GroupNorm, bool]]]) -> list[Node]:
    """Nodes normalised by a GroupNorm of G groups lose whole GroupNorm groups (``groups=G``, tied
    to themselves): each kept group then holds the same channels, so its mean and variance, and
    the cut model's outputs on those channels, are exactly the base's. A node whose GroupNorms
    differ in group count, meet it through a concat or reshape, or that is also tied to grouped
    convs of another group count is kept whole, with one line saying which norm."""
    out = list(nodes)
    for i, ns in enumerate(norms):
        if not ns:
            continue
        n, counts = nodes[i], {m.num_groups for _, m, _ in ns}
        bad = next((name for name, m, aligned in ns if not aligned or m.num_channels != n.channels), None)
        g = ns[0][1].num_groups
        if bad or len(counts) > 1 or (n.groups > 1 and not (n.groups == g and n.tie)):
            why = (f"its channels reach the GroupNorm {bad} through a concat, split or reshape" if bad else
                   f"its GroupNorms ({', '.join(name for name, _, _ in ns)}) have {sorted(counts)} groups"
                   + (f" and its grouped convolutions {n.groups}, cut by the same positions in every group"
                      if n.groups > 1 else ""))
            out[i] = dataclasses.replace(n, prunable=False, fixed=why)
        elif n.groups == 1:  # (tied to grouped convs of g groups: their whole groups are the norm's)
            out[i] = dataclasses.replace(n, groups=g, tie=n.name)
    return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """``discover`` runs for every candidate cut: say a model-level fact once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _untieable(members: list[Node], ts: list[_Touch]) -> str:
    """Why these nodes cannot lose whole groups together ('' when they can)."""
    counts = {t.module.groups for t in ts}
    if len(counts) > 1:
        return f"their grouped convs have different group counts ({sorted(counts)})"
    bad = next((t for t in ts if not t.aligned), None)
    if bad:
        return (f"{bad.conv} meets them through a concat, split or reshape, so its groups are not "
                "whole blocks of one node")
    fed = {t.conv for t in ts if not t.out}
    made = {t.conv for t in ts if t.out}
    if fed != made:
        conv = sorted(fed ^ made)[0]
        return f"{conv}'s {'input' if conv in made else 'output'} is not a prunable node (a model input?)"
    return ""


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
        why = n.fixed or "its channels are tied to grouped convolutions whose groups do not divide them"
        causes.setdefault(re.sub(r" \(channel shuffle: .*\)$", "", why), []).append(n)
    parts = [f"{len(ns)} because {why} (e.g. {ns[0].name})" for why, ns in causes.items()]
    return f"{len(fixed)} of {len(nodes)} nodes are kept whole: " + "; ".join(parts)


def _run_hooked(model: nn.Module, example: torch.Tensor, hooks: list[tuple[str, Callable[..., None]]]) -> None:
    """One eval-mode forward of ``example[:1]`` with forward hooks on the named modules (removed
    after, the model's train/eval mode restored)."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(fn) for name, fn in hooks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def stage_of(model: nn.Module, nodes: list[Node], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Node name -> the spatial size of its feature map: nodes of one resolution share a stage."""
    sizes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def fn(mod, inp, out) -> None:
            sizes.setdefault(name, tuple(out.shape[2:]))

        return fn

    _run_hooked(model, example, [(n.capture, hook(n.name)) for n in nodes])
    return sizes


def stem_of(model: nn.Module, nodes: list[Node], example: torch.Tensor) -> str | None:
    """The node whose channels the first-run conv makes (the stem, reading the image), or None.

    On ResNets that is the first stage's residual stream (the stem conv's channels run through it)."""
    owner = {p: n.name for n in nodes if not n.flat for p in n.producers}
    first: list[str] = []

    def hook(name: str):
        def fn(mod, inp, out) -> None:
            if not first:
                first.append(name)

        return fn

    _run_hooked(model, example, [(name, hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)])
    return owner.get(first[0]) if first else None


def last_node(nodes: list[Node]) -> Node:
    """The last conv node: the one feeding the classifier (an MLP head's ``flat`` nodes come
    after it and are not it)."""
    return max([n for n in nodes if not n.flat] or nodes, key=lambda n: n.order)
