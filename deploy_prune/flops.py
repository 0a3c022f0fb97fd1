"""FLOPs and parameters counted on the real traced model with PyTorch's own flop counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Cost:
    flops: int  # for one input at the example's shape, batch 1
    params: int
    per_module: dict[str, int]  # leaf module name -> FLOPs


def count(model: nn.Module, example: torch.Tensor) -> Cost:
    """FLOPs (multiply-add = 2 FLOPs) at batch 1 and the parameter count of ``model``."""
    x = example[:1]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    per_module = {}
    leaves = {n for n, m in model.named_modules() if not any(True for _ in m.children())}
    for name, ops in counter.get_flop_counts().items():
        # names look like "Global", "VGG.features.0" (class prefix, then the module path)
        path = name.split(".", 1)[1] if "." in name else name
        if path in leaves:
            per_module[path] = int(sum(ops.values()))
    params = sum(p.numel() for p in model.parameters())
    return Cost(flops=int(counter.get_total_flops()), params=int(params), per_module=per_module)
