"""Channel-wise multiplicative gates on nodes, as forward hooks (no change to the model).

Used by beta scoring (|beta| gates, OSPR eq. 2) and RBP (multiplicative noise). A gate on a
node multiplies the output of every module that produces the node's channels, so a zero gate
silences the channel everywhere it is produced: for BN/ReLU nets it is exactly equivalent to
cutting the channel out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deploy_prune.nodes import Node


class ChannelGates:
    """Context manager: ``with ChannelGates(model, nodes, factor): model(x)``.

    ``factor(node_name)`` returns a (C,) tensor multiplied into the node's channels.
    """

    def __init__(self, model: nn.Module, nodes: list[Node], factor: Callable[[str], torch.Tensor]) -> None:
        self.model, self.nodes, self.factor = model, nodes, factor
        self._handles: list = []

    def __enter__(self) -> ChannelGates:
        modules = dict(self.model.named_modules())
        for node in self.nodes:
            for i, gate in enumerate(node.gates):
                m = modules[gate]
                # Linear and plain LayerNorm work channels-last ((B, H, W, C): ConvNeXt's MLP)
                last = isinstance(m, nn.Linear) or type(m) is nn.LayerNorm
                index = None
                if node.maps:  # this gate's channels -> the node's (-1: not the node's: factor 1)
                    index = torch.tensor([c if c >= 0 else node.channels for c in node.maps[i]])
                self._handles.append(m.register_forward_hook(self._hook(node.name, last, index)))
        return self

    def _hook(self, name: str, channels_last: bool = False, index: torch.Tensor | None = None):
        def hook(mod, inp, out):  # out: (B, C, H, W), or (B, H, W, C) when channels_last
            f = self.factor(name).to(out.dtype)
            if index is not None:
                f = torch.cat([f, f.new_ones(1)])[index.to(f.device)]
            if channels_last:
                return out * f
            return out * f.view(1, -1, *([1] * (out.dim() - 2)))

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class frozen:  # noqa: N801  (used as a context manager)
    """Freeze all parameters of ``model`` (and put it in eval mode) for the block."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._training = self.model.training
        for p, _ in self._flags:
            p.requires_grad_(False)
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._training)
