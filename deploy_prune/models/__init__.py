"""Model registry: CIFAR-style VGG/ResNet, a small VGG for CI, and torchvision architectures.

Every builder takes ``num_classes`` and ``in_channels`` (keyword-only) plus its own keyword
arguments, and returns a plain ``nn.Module`` with random weights. Weights come from artifacts
or from a local file; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune._registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    input_size: int  # a natural square input side for tests and examples


MODELS: Registry[ModelSpec] = Registry("model")


def build_model(arch: str, *, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with random weights."""
    spec = MODELS.get(arch)
    return spec.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local state-dict file (``.pth`` or ``.safetensors``) into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # weights_only: a pickle carrying code or arbitrary objects is refused, not run
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, truncated zip, SafetensorError, ...: one line
        raise ValueError(f"model.weights: {path} is not a readable state dict (a truncated file, or a "
                         f"pickle of objects other than tensors): {type(e).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights: {path} does not hold a state dict of tensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the architecture "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )


# Importing the families registers them.
from deploy_prune.models import cifar, tv  # noqa: E402,F401
