"""ONNX Runtime with the TensorRT execution provider (``ort-trt``), CUDA only.

The same ONNX file and IO binding as ``ort`` on CUDA; TensorRT builds one engine over an
explicit batch profile (1 .. max_batch) and caches it in the artifact's work directory.

fp16 is fed as the native ``tensorrt`` backend feeds it: the fp16-typed ONNX export (fp32 IO,
fp16 inside), with ``trt_fp16_enable`` left off. The builder flag cannot work on TensorRT 11,
which builds strongly typed networks only (the types come from the graph), and on TensorRT 10 a
weakly typed build would re-run its own precision choice on an already-reduced graph.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.backends._base import Artifact, register
from bench.backends.ort import ORTBackend


@register("ort-trt")
class ORTTensorRTBackend(ORTBackend):
    """``TensorrtExecutionProvider`` first, CUDA and CPU providers for unsupported nodes."""

    devices = ("cuda",)
    precisions = ("fp32", "fp16")
    precision_note = "fp16 runs the fp16-typed ONNX export (fp32 IO), as the tensorrt backend builds it"
    provider_by_device = {"cuda": "TensorrtExecutionProvider"}
    install_hint = {"cuda": "onnxruntime-gpu and tensorrt"}

    def onnx_precision(self) -> str:
        return self.precision  # fp16: the fp16-typed export, not a builder flag

    def providers(self, artifact: Artifact, example: torch.Tensor) -> list[Any]:
        from export.to_onnx import INPUT_NAME

        name = INPUT_NAME  # export_onnx's input name, whichever path wrote the file
        shape = "x".join(str(d) for d in example.shape[1:])
        opt = min(8, self.options.max_batch)
        trt = {**self.cuda_options(),
               "trt_fp16_enable": False,  # precision comes from the ONNX file's types
               "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(artifact.workdir / f"ort-trt-{self.precision}"),
               "trt_profile_min_shapes": f"{name}:1x{shape}",
               "trt_profile_opt_shapes": f"{name}:{opt}x{shape}",
               "trt_profile_max_shapes": f"{name}:{self.options.max_batch}x{shape}"}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", self.cuda_options()),
                "CPUExecutionProvider"]
