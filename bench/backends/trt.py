"""Native TensorRT engines (``tensorrt``), CUDA only.

The artifact's ONNX file is built into an engine by ``export.to_trt.build_engine`` over a batch
profile 1 .. max_batch, and run by ``export.to_trt.TRTRunner`` (``execute_async_v3`` on
PyTorch device buffers and stream; no pycuda).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.backends._base import (
    Artifact,
    Backend,
    BackendOptions,
    first_tensor,
    missing_export,
    missing_package,
    register,
)
from bench.backends.ort import onnx_file


@register("tensorrt")
class TensorRTBackend(Backend):
    """An engine per artifact and precision; fp32 device tensors in and out."""

    devices = ("cuda",)
    precisions = ("fp32", "fp16", "bf16")

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        return (missing_package("tensorrt", "tensorrt")
                or missing_export("to_trt", "build_engine")
                or missing_export("to_trt", "TRTRunner")
                or missing_export("to_onnx", "export_onnx"))

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        from export.to_trt import TRTRunner, build_engine

        onnx_path = onnx_file(artifact, example, self.options)
        out = artifact.workdir / f"{artifact.name}-{self.precision}.engine"
        max_batch = max(1, self.options.max_batch)
        self.path = artifact.cached(f"trt:{self.precision}", lambda: Path(build_engine(
            onnx_path, out, precision=self.precision, min_batch=1, opt_batch=min(8, max_batch),
            max_batch=max_batch, timing_cache=artifact.workdir / "trt.timing-cache", force=True,
            model=artifact.model, metadata={"variant": artifact.name})))
        self.runner = TRTRunner(self.path)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to("cuda", torch.float32, non_blocking=True).contiguous()  # (B, C, H, W)

    def run(self, inputs: torch.Tensor) -> Any:
        return first_tensor(self.runner(inputs))  # (B, K)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "artifact": str(self.path)}

    def close(self) -> None:
        self.__dict__.pop("runner", None)
