"""timm (PyTorch Image Models) architectures as ``timm.NAME``, built with random weights.

timm is an optional dependency (``pip install timm``, or the ``zoo`` extra): nothing here
imports it until a ``timm.*`` name is asked for, and then a missing timm is one line saying
how to install it. Models are always built with ``pretrained=False``: weights come from the
user's own file (``deploy-prune import --arch timm.NAME --weights FILE``), never from a hub.
A pretrained tag is accepted (``timm.resnet18.a1_in1k``); it only picks the preprocessing
defaults (mean/std, crop, resize filter) of that tag's ``pretrained_cfg``.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from deploy_prune.models import ModelSpec

PREFIX = "timm."
INSTALL_HINT = "pip install timm (or pip install 'deploy-prune[zoo]')"


class MissingZoo(KeyError):
    """``timm.NAME`` was asked for and timm is not installed."""

    def __str__(self) -> str:  # KeyError's repr-quoting would wrap the one line in quotes
        return str(self.args[0]) if self.args else ""


def _timm():
    """The timm module, or None when it is not installed."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        return None


def missing_message(arch: str) -> str:
    return f"model architecture {arch!r} needs timm, which is not installed: {INSTALL_HINT}"


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def timm_builder(name: str):
    def build(*, num_classes: int, in_channels: int, **kw) -> nn.Module:
        timm = _timm()
        if timm is None:
            raise MissingZoo(missing_message(PREFIX + name))
        kw.pop("pretrained", None)  # never download: weights come from the user's file
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)

    return build


def resolve(arch: str) -> ModelSpec | None:
    """``timm.NAME`` -> any timm model; None for other names or names timm does not know.
    Raises :class:`MissingZoo` (one line) when timm is not installed."""
    if not is_timm(arch):
        return None
    timm = _timm()
    if timm is None:
        raise MissingZoo(missing_message(arch))
    name = arch[len(PREFIX):]
    if not name or not timm.is_model(name):
        return None
    size = pretrained_defaults(arch).get("input_size", 224)
    return ModelSpec(timm_builder(name), input_size=size)


def names() -> list[str]:
    """Every ``timm.NAME`` (no tags); empty when timm is not installed."""
    timm = _timm()
    return [PREFIX + n for n in timm.list_models()] if timm is not None else []


def cnn_names(pattern: str = "*") -> list[str]:
    """timm model names matching ``pattern`` that are not transformers/attention hybrids by name
    (a listing for sweeps; the pruner still decides per model)."""
    timm = _timm()
    if timm is None:
        return []
    skip = ("vit", "deit", "swin", "beit", "cait", "xcit", "levit", "coat", "crossvit", "pvt", "twins",
            "mvit", "mobilevit", "efficientformer", "eva", "maxvit", "maxxvit", "coatnet", "tnt", "pit_",
            "convit", "gcvit", "nest_", "sequencer", "mixer", "resmlp", "gmlp", "poolformer", "volo",
            "davit", "edgenext", "fastvit", "hiera", "sam2", "tiny_vit", "next_vit", "vitamin", "halonet",
            "botnet", "lambda", "sebotnet", "haloregnet", "lamhalobotnet", "eca_botnext", "eca_halonext",
            "focalnet", "hgnet", "rdnet", "aimv2", "naflex", "flexivit", "samvit", "test_")
    return [PREFIX + n for n in timm.list_models(pattern) if not any(s in n for s in skip)]


def pretrained_defaults(arch: str) -> dict[str, Any]:
    """The evaluation preprocessing timm records for ``arch`` (its ``pretrained_cfg``): mean, std,
    crop_pct, interpolation, input_size; {} when timm has none (ImageNet's are used then)."""
    timm = _timm()
    if timm is None or not is_timm(arch):
        return {}
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch[len(PREFIX):])
    except Exception:  # noqa: BLE001  (an unknown tag or a cfg-less model: fall back to ImageNet's)
        cfg = None
    if cfg is None:
        return {}
    out: dict[str, Any] = {}
    if cfg.mean and cfg.std and len(cfg.mean) == len(cfg.std):
        out.update(mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std))
    if cfg.crop_pct and 0 < cfg.crop_pct <= 1:
        out["crop_pct"] = float(cfg.crop_pct)
    if cfg.interpolation in ("bilinear", "bicubic", "nearest"):
        out["interpolation"] = cfg.interpolation
    if cfg.input_size and len(cfg.input_size) == 3:
        out["input_size"] = int(cfg.input_size[-1])
    return out
