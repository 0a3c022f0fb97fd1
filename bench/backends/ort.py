"""ONNX Runtime (``ort``): the ONNX file written by ``export.to_onnx``.

CPU: the CPU execution provider with pinned intra-op threads, sequential execution, all graph
optimisations. CUDA: the CUDA execution provider with IO binding on PyTorch device buffers and
a dedicated PyTorch stream given to ORT as its compute stream (``user_compute_stream``), so no
host staging hides in ``run`` and the timer's CUDA events bracket ORT's kernels on that
stream. A session that silently fell back to another provider is an error, not a measurement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.backends._base import (
    Artifact,
    Backend,
    BackendOptions,
    missing_package,
    register,
)
from bench.backends.onnx_cache import onnx_file


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers in this installation."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


@register("ort")
class ORTBackend(Backend):
    """An ``onnxruntime.InferenceSession`` on the CPU or CUDA execution provider."""

    precisions = ("fp32",)
    precision_note = ("ort times the fp32 graph; the fp16 ONNX export (export --format onnx --precision "
                      "fp16) is for TensorRT 11 strongly typed builds")
    provider_by_device = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    install_hint = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu"}

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        reason = missing_package("onnxruntime", cls.install_hint[device])
        if reason:
            return reason
        wanted = cls.provider_by_device[device]
        have = available_providers()
        if wanted not in have:
            return (f"onnxruntime has no {wanted} (providers: {', '.join(have)}; "
                    f"pip install {cls.install_hint[device]})")
        return None

    def session_options(self) -> Any:
        """Pinned intra-op threads, one inter-op thread, sequential, all graph optimisations."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return so

    def cuda_options(self) -> dict[str, Any]:
        """Device and compute stream for ORT's CUDA-based providers."""
        return {"device_id": torch.cuda.current_device(),
                "user_compute_stream": str(self.stream.cuda_stream)}

    def providers(self, artifact: Artifact, example: torch.Tensor) -> list[Any]:
        """The provider list for the session, preferred first."""
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        return [("CUDAExecutionProvider", self.cuda_options()), "CPUExecutionProvider"]

    def onnx_precision(self) -> str:
        """Which ONNX export the session loads: the fp32 graph (``ort`` times only fp32)."""
        return "fp32"

    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        import onnxruntime as ort

        from export.onnx_files import check_data_file

        self.path = onnx_file(artifact, example, self.options, self.onnx_precision())
        self.stream = torch.cuda.Stream() if self.device == "cuda" else None
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=self.session_options(),
                                                providers=self.providers(artifact, example))
        except Exception:
            check_data_file(self.path)  # ORT reads NAME.onnx.data beside it: name it when gone
            raise
        used = self.session.get_providers()[0]
        if used != self.provider_by_device[self.device]:
            raise RuntimeError(f"onnxruntime fell back to {used} instead of "
                               f"{self.provider_by_device[self.device]}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.num_classes = artifact.plan.num_classes
        self._outputs: dict[int, torch.Tensor] = {}

    def upload(self, host: torch.Tensor) -> Any:
        if self.device == "cpu":
            return host.contiguous().numpy()  # (B, C, H, W) float32, zero-copy
        x = host.to("cuda", torch.float32, non_blocking=True).contiguous()
        self.stream.wait_stream(torch.cuda.current_stream())  # ORT's stream sees the H2D copy
        x.record_stream(self.stream)
        return x

    def timing_stream(self) -> Any:
        return self.stream

    def run(self, inputs: Any) -> Any:
        if self.device == "cpu":
            return self.session.run([self.output_name], {self.input_name: inputs})[0]  # (B, K)
        return self._run_bound(inputs)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """IO binding on PyTorch CUDA buffers: no host copies inside the timed call."""
        out = self._outputs.get(x.shape[0])
        if out is None:
            out = torch.empty(x.shape[0], self.num_classes, device="cuda", dtype=torch.float32)
            self._outputs[x.shape[0]] = out
        binding = self.session.io_binding()
        dev = torch.cuda.current_device()
        binding.bind_input(self.input_name, "cuda", dev, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        torch.cuda.current_stream().wait_stream(self.stream)  # D2H after ORT's kernels
        return out  # (B, K)

    def download(self, out: Any) -> torch.Tensor:
        if isinstance(out, np.ndarray):
            return torch.from_numpy(out).float()
        return out.float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "artifact": str(self.path), "threads": self.options.threads,
                "providers": ",".join(self.session.get_providers())}

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self.__dict__.pop("_outputs", None)
