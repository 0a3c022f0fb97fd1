"""The ONNX file of a benchmarked artifact, exported once and shared by every backend that
takes ONNX (``ort``, ``ort-trt``, ``tensorrt``) and by the suite, which exports ahead of the
measurements. Not a backend: a helper of the backends, kept apart from any one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.backends._base import Artifact, BackendOptions

if TYPE_CHECKING:
    from deploy_prune.artifacts import ModelPlan


def onnx_key(precision: str = "fp32") -> str:
    """The :meth:`Artifact.cached` key of the artifact's ONNX file at ``precision``."""
    return "onnx" if precision == "fp32" else f"onnx:{precision}"


def write_onnx(model: torch.nn.Module, plan: ModelPlan, variant: str, example: torch.Tensor, out: Path, *,
               opset: int, precision: str = "fp32") -> Path:
    """Export ``model`` as the bench backends take it: dynamic batch, verified in ONNX Runtime."""
    from export.to_onnx import export_onnx

    meta = {"variant": variant, "plan_sha256": plan.digest()}
    return Path(export_onnx(model, example, out, opset=opset, dynamic_batch=True, verify=True,
                            metadata=meta, force=True, precision=precision))


def seed_onnx(artifact: Artifact, path: Path) -> None:
    """Hand ``artifact`` an fp32 ONNX file exported ahead of time, so no backend exports it again."""
    artifact.cached(onnx_key(), lambda: path)


def onnx_file(artifact: Artifact, example: torch.Tensor, options: BackendOptions,
              precision: str = "fp32") -> Path:
    """The artifact's ONNX export at ``precision`` (dynamic batch), written once and shared.

    fp32 is the file ``ort``, ``ort-trt`` and ``tensorrt`` share; fp16 (fp32 IO, fp16 inside:
    what a strongly typed TensorRT builds an fp16 engine from) is cached under its own key.
    """
    suffix = "" if precision == "fp32" else f"-{precision}"
    out = artifact.workdir / f"{artifact.name}{suffix}.onnx"
    return artifact.cached(onnx_key(precision), lambda: write_onnx(
        artifact.model, artifact.plan, artifact.name, example, out, opset=options.opset, precision=precision))
