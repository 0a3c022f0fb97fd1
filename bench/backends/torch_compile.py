"""``torch.compile`` (``compile``): Inductor kernels; mode ``reduce-overhead`` adds CUDA graphs.

Each batch size is compiled as its own static-shape graph (``dynamic=False``), as a deployment
would; Dynamo's recompile limit is raised so a batch sweep of base and slim (which share one
``forward`` code object) never silently falls back to eager mode.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from bench.backends._base import Artifact, BackendOptions, register
from bench.backends.torch_eager import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Dynamo's per-code-object cache limit (named cache_size_limit before torch 2.6)."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(int(getattr(dynamo_config, key)), limit))


@register("compile")
class CompileBackend(TorchBackend):
    """The eager model wrapped by ``torch.compile(mode=options.compile_mode, dynamic=False)``."""

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        if options.compile_mode not in MODES:
            return f"unknown torch.compile mode {options.compile_mode!r} (modes: {', '.join(MODES)})"
        if device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return "Inductor on CPU needs a C++ compiler (apt-get install g++)"
        return super().requirements(device, precision, options)

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        super().prepare(artifact, example)
        _raise_recompile_limit()
        self.compiled = torch.compile(self.model, mode=self.options.compile_mode, dynamic=False)

    def run(self, inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            out = self.compiled(inputs)  # (B, K)
        if self.options.compile_mode == "reduce-overhead" and self.device == "cuda":
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compile_mode": self.options.compile_mode}

    def close(self) -> None:
        self.__dict__.pop("compiled", None)
        super().close()
