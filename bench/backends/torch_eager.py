"""PyTorch eager mode (``torch``): CPU or CUDA, fp32 / fp16 / bf16, optional channels_last."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench.backends._base import Artifact, Backend, BackendOptions, apply_cuda_settings, register


@register("torch")
class TorchBackend(Backend):
    """The slim ``nn.Module`` itself, cast and moved, called under ``torch.inference_mode``."""

    model: nn.Module

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16 support (torch.cuda.is_bf16_supported() is False)"
        return None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.options.channels_last else torch.contiguous_format

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        """A private copy of the model, on the device, at the precision and memory format."""
        self.cuda_settings = apply_cuda_settings(self.options) if self.device == "cuda" else {}
        model = copy.deepcopy(artifact.model).eval()
        self.model = model.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, self.dtype, non_blocking=True,
                       memory_format=self.memory_format)  # (B, C, H, W)

    def run(self, inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.model(inputs)  # (B, K)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "channels_last": self.options.channels_last, "threads": torch.get_num_threads(),
                **getattr(self, "cuda_settings", {})}

    def close(self) -> None:
        self.__dict__.pop("model", None)
