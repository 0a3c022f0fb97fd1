"""PyTorch model -> AOTInductor ``.pt2`` package (CPU, or CUDA where present), verified.

``torch.export.export`` captures the BN-folded model with a dynamic batch axis in
``[1, max_batch]``; ``torch._inductor.aoti_compile_and_package`` compiles it to native code and
packs it. The package is loaded back with ``torch._inductor.aoti_load_package`` and checked
against the PyTorch model before it is renamed into place. A JSON sidecar ``<out>.json`` holds
its provenance, compile time and parity figures.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.artifacts import atomic_write_text as write_text_atomic
from export._staging import ensure_writable, staged
from export.errors import BackendUnavailableError, first_line
from export.fold import fold_batchnorm
from export.formats import COMMON_OPTIONS, FORMATS, FormatSpec, export_versions, from_model_dir
from export.parity import batches_in_range, check_example, check_parity, scaled_atol

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "deploy-prune/aoti-package@1"
# (rtol, atol). CUDA convolutions run in TF32 by default on Ampere and newer, in eager and
# compiled code alike but with different kernels, hence the looser CUDA default, whose atol is
# scaled by the logits' magnitude (export.parity.scaled_atol) unless given explicitly.
DEFAULT_TOLERANCE = {"cpu": (1e-3, 1e-4), "cuda": (1e-2, 1e-2)}


class AOTIRunner:
    """A loaded AOTInductor package: call it with a (B, C, H, W) tensor, get the logits."""

    def __init__(self, compiled: Any, device: torch.device, path: Path) -> None:
        self._compiled = compiled
        self.device = device
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._compiled(x.to(self.device).contiguous())
        return out[0] if isinstance(out, list | tuple) else out

    def __repr__(self) -> str:
        return f"AOTIRunner({str(self.path)!r}, device={str(self.device)!r})"


def export_aoti(model: nn.Module, example: torch.Tensor, out: str | Path, *, device: str = "cpu",
                dynamic_batch: bool = True, max_batch: int = 256, verify: bool = True, force: bool = False,
                rtol: float | None = None, atol: float | None = None,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Compile ``model`` into an AOTInductor package at ``out`` (a ``.pt2`` path).

    With ``verify`` the package is loaded back and run at batch 1 and 7 (clipped to
    ``max_batch``; the example's batch when static) against ``model`` on ``device``; a mismatch
    raises ParityError and leaves no file. ``rtol``/``atol`` default per device: CPU 1e-3/1e-4,
    CUDA 1e-2/1e-2 with atol scaled by the logits' magnitude (TF32 convolutions).
    """
    out = Path(out)
    if out.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {out}")
    ensure_writable(out, force=force)
    check_example(example)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    program = export_program(model, example, device=dev, dynamic_batch=dynamic_batch, max_batch=max_batch)
    with staged(out, force=force, suffix=".pt2") as tmp:
        _compile(program, tmp)
        seconds = time.perf_counter() - t0
        parity = _verify(tmp, model, example, dev, dynamic_batch, max_batch, rtol, atol) if verify else None
        if parity is None:
            log.warning("AOTInductor parity check skipped (verify=False): %s is unverified", out)
        sidecar = _sidecar(dev, dynamic_batch, max_batch, example, seconds, parity, metadata)
        write_text_atomic(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
    log.info("wrote %s (%.1f MB, %s) in %.1f s", out, out.stat().st_size / 1e6, dev, seconds)
    return out


def load_aoti(path: str | Path, device: str = "cpu") -> AOTIRunner:
    """Load a ``.pt2`` package for ``device``; a callable from a (B, C, H, W) tensor to logits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AOTInductor package not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an AOTInductor package (expected a .pt2 zip archive)")
    dev = resolve_device(device)
    # device_index only matters (and is only passed) for CUDA packages
    where = {"device_index": dev.index if dev.index is not None else torch.cuda.current_device()} \
        if dev.type == "cuda" else {}
    try:
        compiled = torch._inductor.aoti_load_package(str(path), **where)
    except Exception as e:  # RuntimeError from the C++ loader, KeyError for a foreign zip, ...
        raise ValueError(f"{path}: cannot load this AOTInductor package on {dev} "
                         f"({type(e).__name__}: {first_line(e)})") from None
    return AOTIRunner(compiled, dev, path)


def export_program(model: nn.Module, example: torch.Tensor, *, device: torch.device,
                   dynamic_batch: bool = True, max_batch: int = 256) -> torch.export.ExportedProgram:
    """``torch.export`` of the BN-folded model on ``device``, batch axis in [1, max_batch]."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    folded = fold_batchnorm(model).to(device)
    x = example.to(device)
    shapes = None
    if dynamic_batch:
        if x.shape[0] < 2:
            x = x[:1].repeat(2, 1, 1, 1)  # a size-1 example would specialise the batch axis
        shapes = ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)
    try:
        with torch.no_grad():
            return torch.export.export(folded, (x,), dynamic_shapes=shapes)
    except Exception as e:
        raise ValueError(f"torch.export failed on {type(model).__name__}: "
                         f"{type(e).__name__}: {first_line(e)}") from e


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; BackendUnavailableError when CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"AOTInductor export supports cpu and cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} needs a CUDA GPU; none is visible to PyTorch")
    return dev


def sidecar_path(out: Path) -> Path:
    """``model.pt2`` -> ``model.pt2.json``."""
    return out.with_name(out.name + ".json")


def _compile(program: torch.export.ExportedProgram, tmp: Path) -> None:
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    except Exception as e:  # inductor lowering / C++ compiler failures
        raise ValueError(f"AOTInductor compilation failed: {type(e).__name__}: {first_line(e)}") from e


def _verify(path: Path, model: nn.Module, example: torch.Tensor, dev: torch.device, dynamic_batch: bool,
            max_batch: int, rtol: float | None, atol: float | None) -> dict[str, Any]:
    """Load the package back and compare it with ``model`` on ``dev``; the parity record."""
    runner = load_aoti(path, str(dev))
    ref_model = copy.deepcopy(model).eval().to(dev)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return ref_model(x.to(dev))

    shape = example.shape[1:]
    r, a = DEFAULT_TOLERANCE[dev.type]
    r = r if rtol is None else rtol
    a = atol if atol is not None else (scaled_atol(a, reference, shape) if dev.type == "cuda" else a)
    batches = batches_in_range(1, max_batch) if dynamic_batch else (example.shape[0],)
    diffs = check_parity(runner, reference, shape, batches, rtol=r, atol=a,
                         what=f"AOTInductor package on {dev}")
    return {"max_abs_diff": {str(b): d for b, d in diffs.items()}, "rtol": r, "atol": a}


def _sidecar(dev: torch.device, dynamic_batch: bool, max_batch: int, example: torch.Tensor, seconds: float,
             parity: dict[str, Any] | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"format": SIDECAR_FORMAT, "device": str(dev), "gpu": gpu, "dynamic_batch": dynamic_batch,
            "max_batch": max_batch if dynamic_batch else int(example.shape[0]),
            "input_shape": list(example.shape[1:]), "compile_seconds": round(seconds, 3), "parity": parity,
            "versions": export_versions(), **dict(metadata or {})}


FORMATS.register("aoti")(FormatSpec(
    export=from_model_dir(export_aoti), suffix=".pt2",
    options=COMMON_OPTIONS | {"device", "dynamic_batch", "batch", "max_batch"},
    help="AOTInductor .pt2 package (CPU or CUDA), loaded back and verified"))
