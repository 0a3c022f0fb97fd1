"""torchvision ImageNet architectures, built with random weights (``weights=None``).

``vgg16``, ``vgg16_bn`` and ``resnet50`` are registered by name; any other torchvision
classification model is reachable as ``tv.NAME`` (e.g. ``tv.mobilenet_v2``).
"""

from __future__ import annotations

from torch import nn

from deploy_prune.models import MODELS, ModelSpec


def _adapt_input(model: nn.Module, in_channels: int) -> None:
    """Replace the first conv when the input is not RGB."""
    if in_channels == 3:
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            bias=m.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


def tv_builder(name: str):
    def build(*, num_classes: int, in_channels: int, **kw) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        _adapt_input(model, in_channels)
        return model

    return build


REGISTERED = ("vgg16", "vgg16_bn", "resnet50")
for _name in REGISTERED:
    MODELS.register(_name)(ModelSpec(tv_builder(_name), input_size=224))


def is_torchvision(arch: str) -> bool:
    """Whether ``arch`` is a torchvision ImageNet model (its preprocessing defaults are ImageNet's)."""
    return arch.startswith("tv.") or arch in REGISTERED


def _resolve_tv(name: str) -> ModelSpec | None:
    """``tv.NAME`` -> any torchvision classification model."""
    if not name.startswith("tv."):
        return None
    import torchvision

    if name[3:] not in torchvision.models.list_models(module=torchvision.models):
        return None
    return ModelSpec(tv_builder(name[3:]), input_size=224)


MODELS.set_fallback(_resolve_tv)
