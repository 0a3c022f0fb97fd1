"""Native TensorRT engines (``tensorrt``), CUDA only.

The artifact's ONNX file is built into an engine by ``export.to_trt.build_engine`` over a batch
profile 1 .. max_batch, and run by ``export.to_trt.TRTRunner`` (``execute_async_v3`` on
PyTorch device buffers and stream; no pycuda).

On TensorRT 10, ``int8`` engines are calibrated by ``export.calibration.calibration_for``: on
the validation images of the dataset the model was made with, or, for a model without one (the
paper-claims suite's random-weight models), on seeded random images. Such an engine is timed
but not parity-checked (random scales make its outputs meaningless, not its latency), and its
rows say ``calibration=random``.

TensorRT 11 builds strongly typed: an fp16 engine is built from the artifact's fp16-typed ONNX
export (fp32 IO, fp16 inside; exported once and cached beside the fp32 one), and int8 and bf16
are reported unavailable, since implicit int8 calibration was removed and deploy-prune exports
neither Q/DQ nor bf16 graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.backends._base import (
    Artifact,
    Backend,
    BackendOptions,
    missing_package,
    register,
)
from bench.backends.onnx_cache import onnx_file


def tensorrt_major() -> int | None:
    """The installed TensorRT's major version, or None when it cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        return None
    from export.to_trt import tensorrt_major as major_of

    return major_of(tensorrt)


@register("tensorrt")
class TensorRTBackend(Backend):
    """An engine per artifact and precision; fp32 device tensors in and out."""

    devices = ("cuda",)
    precisions = ("fp32", "fp16", "bf16", "int8")

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        reason = missing_package("tensorrt", "tensorrt")
        return reason or strong_typing_reason(tensorrt_major(), precision)

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        from export.calibration import RANDOM_SOURCE, calibration_for
        from export.to_trt import TRTRunner, build_engine, onnx_precision_for

        major = tensorrt_major() or 0
        onnx_path = onnx_file(artifact, example, self.options, onnx_precision_for(major, self.precision))
        out = artifact.workdir / f"{artifact.name}-{self.precision}.engine"
        max_batch = max(1, self.options.max_batch)
        calib, self.calibration = None, None
        if self.precision == "int8":  # TensorRT 10 only: requirements() refuses it on 11+
            calib, self.calibration = artifact.cached("trt:calibration", lambda: calibration_for(artifact.plan))
        verify = self.calibration != RANDOM_SOURCE  # seeded random images give no accuracy to check
        self.path = artifact.cached(f"trt:{self.precision}", lambda: Path(build_engine(
            onnx_path, out, precision=self.precision, min_batch=1, opt_batch=min(8, max_batch),
            max_batch=max_batch, timing_cache=artifact.workdir / "trt.timing-cache", force=True,
            calibration_batches=calib, model=artifact.model, verify=verify,
            metadata={"variant": artifact.name, "calibration": self.calibration})))
        self.runner = TRTRunner(self.path)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host.to("cuda", torch.float32, non_blocking=True).contiguous()  # (B, C, H, W)

    def run(self, inputs: torch.Tensor) -> Any:
        return self.runner(inputs)  # TRTRunner gives the logits tensor (B, K)

    def describe(self) -> dict[str, Any]:
        row = {"backend": self.name, "device": self.device, "precision": self.precision,
               "artifact": str(self.path)}
        return {**row, "calibration": self.calibration} if self.calibration else row

    def close(self) -> None:
        self.__dict__.pop("runner", None)


def strong_typing_reason(major: int | None, precision: str) -> str | None:
    """The one-line reason ``precision`` cannot be built on TensorRT ``major`` from what the
    bench exports, None if it can: :func:`export.to_trt.plan_build` decides, as the builder does."""
    from export.errors import first_line
    from export.to_trt import onnx_precision_for, plan_build

    if major is None:
        return None
    try:
        plan_build(major, precision, onnx_precision_for(major, precision))
    except ValueError as e:
        return first_line(e)
    return None
