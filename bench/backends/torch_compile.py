"""``torch.compile`` (``compile``): Inductor kernels; modes ``reduce-overhead`` and ``max-autotune``
add CUDA graphs.

Each batch size is compiled as its own static-shape graph (``dynamic=False``), as a deployment
would. Dynamo's recompile limit is raised so a batch sweep of base and slim (which share one
``forward`` code object) fits, its cache is reset in :meth:`CompileBackend.close` so one model's
graphs never count against the next model's limit, and a call that would still hit the limit
raises (``fail_on_recompile_limit_hit``) instead of running eager: an eager fallback is an
error row, never a ``compile`` number. Each new input shape is also checked to have been
captured into a graph (Dynamo's ``unique_graphs`` counter grows), which catches any other silent
fallback (:func:`compiled_graphs`).
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from bench.backends._base import Artifact, BackendOptions, register
from bench.backends.torch_eager import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # outputs live in graph-owned memory
RECOMPILE_LIMIT = 64


class CompileFallbackError(RuntimeError):
    """torch.compile ran (or would run) the model eagerly: no compiled number can be reported."""


def _raise_recompile_limit(limit: int | None = None) -> None:
    """Dynamo's per-code-object cache limit (named cache_size_limit before torch 2.6), raised to
    ``limit`` (default :data:`RECOMPILE_LIMIT`), never lowered."""
    import torch._dynamo.config as dynamo_config

    limit = RECOMPILE_LIMIT if limit is None else limit

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(int(getattr(dynamo_config, key)), limit))


def compiled_graphs() -> int:
    """Dynamo's count of graphs captured in this process (``counters["stats"]["unique_graphs"]``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _fail_on_recompile_limit() -> None:
    """Make hitting the recompile limit raise instead of falling back to eager (torch >= 2.6:
    ``fail_on_recompile_limit_hit``; older: ``fail_on_cache_limit_hit``). Set process-wide, as
    the limit itself is: a ``config.patch`` around every call would add its cost to every timed call."""
    import torch._dynamo.config as dynamo_config

    for key in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, True)
            return


def reset_dynamo() -> None:
    """Drop every compiled graph and Dynamo's per-code-object caches (``torch._dynamo.reset``)."""
    import torch._dynamo

    torch._dynamo.reset()


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
        _fail_on_recompile_limit()
        self.compiled = torch.compile(self.model, mode=self.options.compile_mode, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()  # input shapes checked to have compiled

    def run(self, inputs: torch.Tensor) -> Any:
        shape = tuple(inputs.shape)
        first = shape not in self.shapes
        before = compiled_graphs() if first else 0
        try:
            with torch.inference_mode():
                out = self.compiled(inputs)  # (B, K)
        except Exception as e:
            if first and "recompile" in f"{type(e).__name__} {e}".lower():
                raise CompileFallbackError(
                    f"torch.compile would fall back to eager for input {shape}: Dynamo's recompile "
                    f"limit was hit ({type(e).__name__})") from e
            raise
        if first:
            if compiled_graphs() <= before:
                raise CompileFallbackError(
                    f"torch.compile captured no graph for input {shape}: the model ran eagerly")
            self.shapes.add(shape)
        if self.options.compile_mode in CUDA_GRAPH_MODES and self.device == "cuda":
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compile_mode": self.options.compile_mode,
                "compiled_shapes": len(getattr(self, "shapes", ()))}

    def close(self) -> None:
        self.__dict__.pop("compiled", None)
        super().close()
        reset_dynamo()  # the next model starts from an empty cache, under the recompile limit
