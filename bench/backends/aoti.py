"""AOTInductor packages (``aoti``): the ``.pt2`` written by ``export.to_aoti``, loaded and run.

The package is exported once per artifact and device into the artifact's work directory, in
fp32: ``export.to_aoti`` verifies a package against fp32 probe inputs, so a half-precision
package cannot be exported (and verified) yet.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.backends._base import (
    Artifact,
    Backend,
    BackendOptions,
    apply_cuda_settings,
    register,
)


@register("aoti")
class AOTIBackend(Backend):
    """``export.to_aoti.export_aoti`` then ``load_aoti``; inputs are plain device tensors."""

    precisions = ("fp32",)
    precision_note = "export.to_aoti verifies packages with fp32 inputs; half precision is not exported"
    path: Path

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return "AOTInductor needs a C++ compiler (apt-get install g++)"
        return None

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        from export.to_aoti import export_aoti, load_aoti

        self.cuda_settings = apply_cuda_settings(self.options) if self.device == "cuda" else {}
        out = artifact.workdir / f"{artifact.name}-{self.device}.pt2"
        self.path = artifact.cached(f"aoti:{self.device}", lambda: Path(export_aoti(
            copy.deepcopy(artifact.model), example, out, device=self.device, dynamic_batch=True,
            max_batch=max(2, self.options.max_batch), verify=True, force=True,
            metadata={"variant": artifact.name})))
        self.fn = load_aoti(self.path, device=self.device)

    def run(self, inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.fn(inputs)  # AOTIRunner gives the logits tensor (B, K)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "artifact": str(self.path), "threads": torch.get_num_threads(),
                **getattr(self, "cuda_settings", {})}

    def close(self) -> None:
        self.__dict__.pop("fn", None)
