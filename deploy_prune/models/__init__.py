"""Model registry: CIFAR-style VGG/ResNet, a small VGG for CI, torchvision architectures
(``tv.NAME``) and, when timm is installed, timm's (``timm.NAME``).

Every builder takes ``num_classes`` and ``in_channels`` (keyword-only) plus its own keyword
arguments, and returns a plain ``nn.Module`` with random weights. Weights come from artifacts
or from a local file; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from deploy_prune._registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    input_size: int  # a natural square input side for tests and examples


MODELS: Registry[ModelSpec] = Registry("model")


def build_model(arch: str, *, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with random weights."""
    spec = get_spec(arch)
    return spec.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def get_spec(arch: str) -> ModelSpec:
    """The registered (or ``tv.NAME``, ``timm.NAME``) architecture; a miss suggests the closest
    names; ``timm.NAME`` without timm installed says how to install it."""
    try:
        return MODELS.get(arch)
    except zoo.MissingZoo:
        raise
    except KeyError:
        raise KeyError(unknown_arch_message(arch)) from None


def arch_names() -> list[str]:
    """Every buildable name: the registered ones, ``tv.NAME`` for torchvision classifiers and
    ``timm.NAME`` for timm models (when timm is installed)."""
    import torchvision

    return (MODELS.names() + [f"tv.{n}" for n in torchvision.models.list_models(module=torchvision.models)]
            + zoo.names())


def unknown_arch_message(arch: str) -> str:
    import difflib

    names = arch_names()
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    exact = [f"{p}{arch}" for p in ("tv.", "timm.") if f"{p}{arch}" in names]  # the prefix was left out
    close = exact + [c for c in close if c not in exact]
    hint = f"did you mean {' or '.join(close[:3])}?" if close else \
        "torchvision models are named tv.NAME, timm models timm.NAME"
    return (f"unknown model architecture {arch!r}; {hint} (registered: {', '.join(MODELS.names())}; "
            "any torchvision classifier as tv.NAME, e.g. tv.resnet18; any timm model as timm.NAME, "
            "e.g. timm.resnet26d, with timm installed)")


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file (any format :mod:`deploy_prune.weights` reads) into ``model``."""
    from deploy_prune.weights import load_weights

    load_weights(model, path)


# Importing the families registers them.
from deploy_prune.models import cifar, tv, zoo  # noqa: E402,F401


def _resolve(name: str) -> ModelSpec | None:
    """Names outside the table: ``tv.NAME`` (torchvision), then ``timm.NAME`` (timm)."""
    return tv.resolve_tv(name) or zoo.resolve(name)


MODELS.set_fallback(_resolve)
