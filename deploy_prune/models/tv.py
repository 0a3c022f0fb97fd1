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


# Models with auxiliary classifiers (training-only heads on inner feature maps). They are built
# without them (``aux_logits=False``) unless asked: a deployed model never runs them, and cut
# channels would feed them inconsistently in train mode. pipeline.prune states this in plan.json.
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def aux_note(arch: str, kwargs: dict) -> str | None:
    """The plan's note when ``arch`` was built with its auxiliary heads dropped."""
    name = arch[3:] if arch.startswith("tv.") else arch
    if name in AUX_HEADS and not kwargs.get("aux_logits", False):
        return (f"auxiliary heads ({', '.join(p.rstrip('.') for p in AUX_HEADS[name])}) dropped for "
                "deployment (aux_logits=False): they are training-only; recovery trains the main head")
    return None


def tv_builder(name: str):
    def build(*, num_classes: int, in_channels: int, **kw) -> nn.Module:
        import torchvision

        if name in AUX_HEADS:
            kw.setdefault("aux_logits", False)
            kw.setdefault("init_weights", True)
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


def resolve_tv(name: str) -> ModelSpec | None:
    """``tv.NAME`` -> any torchvision classification model."""
    if not name.startswith("tv."):
        return None
    import torchvision

    if name[3:] not in torchvision.models.list_models(module=torchvision.models):
        return None
    return ModelSpec(tv_builder(name[3:]), input_size=224)

