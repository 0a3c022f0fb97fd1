"""The one interface every bench backend implements, and what it is handed.

A backend turns a model directory (an :class:`Artifact`) into something callable on a device
at a precision. The timer splits one inference into three calls so that host-device copies
and device compute can be reported separately::

    x = backend.upload(host_batch)   # host tensor -> what run() takes (H2D copy, cast, layout)
    y = backend.run(x)               # the inference itself (timed by CUDA events on a GPU)
    out = backend.download(y)        # -> float CPU tensor (B, K) (D2H copy)

``prepare``, ``run`` and ``describe`` are abstract; ``upload``/``download`` default to the
PyTorch behaviour. A backend that cannot run here says why in :meth:`Backend.unavailable`
(the sweep then writes a ``skipped`` row with that reason) instead of failing at import.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from deploy_prune._registry import Registry
from deploy_prune.artifacts import ModelPlan
from deploy_prune.precision import check_precision

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}
# Every precision a backend may offer: the shared vocabulary (deploy_prune.precision). DTYPES maps
# a precision to the input/weight dtype; tf32 and int8 engines take fp32 inputs.
DEVICES = ("cpu", "cuda")
T = TypeVar("T")


@dataclass
class Artifact:
    """One model directory loaded for benchmarking (``name`` is ``base`` or ``slim``).

    Backends that export (ONNX, AOTInductor, TensorRT) write into ``workdir`` and share what
    they build through :meth:`cached`, so the ONNX file is exported once for ``ort``,
    ``ort-trt`` and ``tensorrt``.
    """

    name: str
    path: Path
    model: nn.Module  # eval mode, CPU, fp32
    plan: ModelPlan
    workdir: Path
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once per key for this artifact; later calls return the first result."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


@dataclass(frozen=True)
class BackendOptions:
    """Knobs shared by all backends; each uses the ones that apply to it."""

    threads: int = 1  # CPU intra-op threads (torch.set_num_threads, ORT intra_op_num_threads)
    channels_last: bool = False  # torch / compile: NHWC memory format
    compile_mode: str = "default"  # torch.compile mode ("reduce-overhead" = CUDA graphs)
    max_batch: int = 128  # largest batch an exported artifact must accept
    opset: int = 18  # ONNX opset for ort / ort-trt / tensorrt


class Backend(ABC):
    """A way to run a model: ``prepare`` once, then ``run`` many times, ``describe`` for rows."""

    name: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = DEVICES
    precisions: ClassVar[tuple[str, ...]] = tuple(DTYPES)
    # why some precisions are missing, for skipped rows
    precision_note: ClassVar[str] = "int8 needs a quantising engine (the tensorrt backend)"

    def __init__(self, *, device: str, precision: str, options: BackendOptions | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
        check_precision(precision)
        self.device = device
        self.precision = precision
        self.dtype = DTYPES.get(precision, torch.float32)  # int8 engines take fp32 inputs
        self.options = options or BackendOptions()

    @classmethod
    def unavailable(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        """``None`` when this backend can run ``device``/``precision`` here, else the reason."""
        if device not in cls.devices:
            return f"{cls.name} does not run on {device} (devices: {', '.join(cls.devices)})"
        if precision not in cls.precisions:
            note = f"; {cls.precision_note}" if cls.precision_note else ""
            return (f"{cls.name} does not support {precision} "
                    f"(precisions: {', '.join(cls.precisions)}{note})")
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device: torch.cuda.is_available() is False"
        return cls.requirements(device, precision, options)

    @classmethod
    def requirements(cls, device: str, precision: str, options: BackendOptions) -> str | None:
        """Backend-specific checks (packages, providers, hardware); ``None`` when met."""
        return None

    @abstractmethod
    def prepare(self, artifact: Artifact, example: torch.Tensor) -> None:
        """Build whatever ``run`` needs (cast, compile, export, load) from ``artifact``.

        ``example`` is a float32 CPU batch (B, C, H, W) of the model's input shape.
        """

    @abstractmethod
    def run(self, inputs: Any) -> Any:
        """One inference on what :meth:`upload` returned; returns what :meth:`download` takes."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings that identify this measurement (written into every result row)."""

    def upload(self, host: torch.Tensor) -> Any:
        """Host float32 batch (B, C, H, W) -> the backend's input (device, dtype)."""
        return host.to(self.device, self.dtype, non_blocking=True)

    def timing_stream(self) -> Any:
        """The CUDA stream ``run`` enqueues on, where the timer records its events."""
        return torch.cuda.current_stream()

    def download(self, out: Any) -> torch.Tensor:
        """The backend's output -> float32 CPU logits (B, K)."""
        return first_tensor(out).float().cpu()

    def close(self) -> None:
        """Release what ``prepare`` built (sessions, device memory); nothing by default."""
        return None


def first_tensor(out: Any) -> Any:
    """The first output of a model that may return a tuple, list or dict of outputs."""
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, list | tuple):
        return out[0]
    return out


def missing_package(module: str, install: str) -> str | None:
    """``None`` when ``module`` can be imported, else a reason naming what to install."""
    if importlib.util.find_spec(module) is None:
        return f"python package {module!r} not installed (pip install {install})"
    return None


BACKENDS: Registry[type[Backend]] = Registry("backend")


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: ``@register("ort")`` sets ``cls.name`` and adds it to :data:`BACKENDS`."""

    def deco(cls: type[Backend]) -> type[Backend]:
        BACKENDS.register(name)(cls)
        cls.name = name
        return cls

    return deco
