"""A model's evaluation preprocessing: input size, resize/centre crop, channels, mean/std.

It is part of the model: ``import`` sets it (torchvision's ImageNet recipe for ``tv.*``
models, the dataset's own otherwise, every field overridable), the base directory carries it
in its plan (``data.*`` of the stored config, and ``preprocess`` spelled out), and every later
stage (scoring, recovery, fine-tuning, each accuracy figure, the bench's accuracy column) builds
its data from it. Training augmentation (``data.augment``) is applied on top, separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deploy_prune.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 224 / 256  # torchvision's recipe: resize the shorter side to 256, centre-crop 224


@dataclass(frozen=True)
class Preprocess:
    """What the evaluation transform does, in order: resize, centre crop, channels, normalise."""

    input_size: int  # side of the square the model sees
    resize: int | None  # shorter side before the centre crop; None: resize straight to input_size
    channels: int  # 1 or 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_json(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize": self.resize, "crop": self.input_size,
                "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def pil_transform(self):
        """The torchvision transform for PIL images (ImageFolder), evaluation and plain training."""
        import torchvision.transforms as T

        mode = T.InterpolationMode(self.interpolation)
        steps = [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.input_size)] if self.resize else \
            [T.Resize((self.input_size, self.input_size), interpolation=mode)]
        if self.channels == 1:
            steps.append(T.Grayscale(1))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(list(self.mean), list(self.std))])

    def tensor_transform(self):
        """The same steps on a (B, C, h, w) batch of [0, 1] floats (in-memory datasets)."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)

        def apply(x: torch.Tensor) -> torch.Tensor:
            x = _resize_crop(x, self.resize, self.input_size, self.interpolation)  # (B, C, S, S)
            x = _to_channels(x, self.channels)
            return (x - mean) / std

        return apply


def _interpolate(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "nearest":
        return torch.nn.functional.interpolate(x, size=hw, mode="nearest")
    return torch.nn.functional.interpolate(x, size=hw, mode=mode, antialias=True, align_corners=False)


def _resize_crop(x: torch.Tensor, resize: int | None, size: int, mode: str = "bilinear") -> torch.Tensor:
    if resize is None:
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        return _interpolate(x, (size, size), mode)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = _interpolate(x, (nh, nw), mode)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise ValueError(f"data.channels: cannot turn {x.shape[1]}-channel images into {channels} channels")


def resolve(cfg: DataConfig, *, size: int, channels: int, mean: Sequence[float], std: Sequence[float],
            crop: bool) -> Preprocess:
    """``cfg``'s preprocessing fields over a dataset's defaults (native size, channels, mean/std).

    ``crop``: the default resize is ``image_size * 256 / 224`` then a centre crop (ImageFolder);
    otherwise the default is a plain resize to ``image_size`` (or none at the native size).
    """
    if cfg.channels not in (None, 1, 3):
        raise ValueError(f"data.channels: expected 1 or 3, got {cfg.channels}")
    out_c = cfg.channels or channels
    side = cfg.image_size or size
    if side < 1 or (cfg.resize and cfg.resize < side) or (cfg.resize or 0) < 0:
        raise ValueError(f"data.resize ({cfg.resize}) must be 0 (no crop) or at least data.image_size ({side}), "
                         "and image_size positive")
    if cfg.interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"data.interpolation: expected bilinear, bicubic or nearest, got {cfg.interpolation!r}")
    if cfg.resize == 0:  # a plain resize of the whole image to image_size, no crop
        resize = None
    else:
        resize = cfg.resize if cfg.resize else (round(side / CROP_RATIO) if crop else None)
    m = _per_channel(cfg.mean, mean, out_c, "data.mean")
    s = _per_channel(cfg.std, std, out_c, "data.std")
    if any(v <= 0 for v in s):
        raise ValueError(f"data.std: every value must be positive, got {list(s)}")
    return Preprocess(input_size=side, resize=resize, channels=out_c, mean=m, std=s,
                      interpolation=cfg.interpolation)


def _per_channel(given: Sequence[float] | None, default: Sequence[float], channels: int,
                 key: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (given if given is not None else default))
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if given is None and channels == 1:  # an RGB dataset's mean/std for a grayscale input
        return (sum(vals) / len(vals),)
    raise ValueError(f"{key}: {len(vals)} values for {channels} channels; give 1 or {channels}")
