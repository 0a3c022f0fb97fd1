"""Capturing nodes' feature maps (after the activation) with forward hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deploy_prune.nodes import Node


class FeatureCapture:
    """``with FeatureCapture(model, nodes) as cap: model(x); cap.maps[name]`` -> (B, C, H, W)."""

    def __init__(self, model: nn.Module, nodes: list[Node]) -> None:
        self.model, self.nodes = model, nodes
        self.maps: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureCapture:
        modules = dict(self.model.named_modules())
        for node in self.nodes:
            self._handles.append(modules[node.capture].register_forward_hook(self._hook(node)))
        return self

    def _hook(self, node: Node):
        def hook(mod, inp, out):
            # BN outputs are pre-activation: apply ReLU (OSPR eq. 9 compares after activation)
            self.maps[node.name] = F.relu(out) if node.capture_relu else out

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
