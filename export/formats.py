"""The export-format registry and :func:`export_model_dir`, the one entry point per model dir.

A format is a :class:`FormatSpec`: a function ``(model, plan, out, *, source, **options) -> Path``
plus the option names it accepts. Each ``to_*.py`` module registers its own, so adding a format
means adding a module, not a branch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from deploy_prune._registry import Registry
from deploy_prune.artifacts import ModelPlan, load_model_dir, versions
from deploy_prune.flops import count

log = logging.getLogger(__name__)

COMMON_OPTIONS = frozenset({"force", "verify", "rtol", "atol"})
_EXTRA_DISTRIBUTIONS = ("onnx", "onnxruntime", "onnxscript", "onnxslim", "tensorrt")


@dataclass(frozen=True)
class FormatSpec:
    """One export format: how to write it from a loaded model directory."""

    export: Callable[..., Path]  # (model, plan, out, *, source, **options) -> Path
    options: frozenset[str]  # keyword options ``export`` accepts besides ``source``
    suffix: str  # the conventional file suffix, e.g. ".onnx"
    help: str


FORMATS: Registry[FormatSpec] = Registry("export format")


def export_versions() -> dict[str, str]:
    """deploy-prune's provenance versions plus the export stack's (those installed)."""
    out = versions()
    for dist in _EXTRA_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(model: nn.Module, plan: ModelPlan, source: str | Path | None) -> dict[str, Any]:
    """What every artifact records about its origin: model, cost, plan hash, source, versions."""
    flops, params = plan.info.get("flops"), plan.info.get("params")
    if flops is None or params is None:
        cost = count(model, plan.example())
        flops, params = cost.flops, cost.params
    return {
        "arch": plan.arch, "pruned": bool(plan.kept), "flops": int(flops), "params": int(params),
        "plan_sha256": plan.digest(), "num_classes": plan.num_classes,
        "input_shape": [plan.in_channels, plan.input_size, plan.input_size],
        "source_dir": str(Path(source).resolve()) if source is not None else None,
        "versions": export_versions(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def from_model_dir(export_fn: Callable[..., Path]) -> Callable[..., Path]:
    """Adapt ``export_fn(model, example, out, **opts)`` to a model directory's plan: the example
    input comes from the plan (batch 2 for a dynamic batch axis, ``batch`` for a static one) and
    the metadata from its provenance."""

    def export(model: nn.Module, plan: ModelPlan, out: Path, *, source: Path | None,
               batch: int = 1, **options: Any) -> Path:
        example = plan.example(2 if options.get("dynamic_batch", True) else batch)
        return export_fn(model, example, out, metadata=provenance(model, plan, source), **options)

    return export


def check_options(fmt: str, options: dict[str, Any]) -> FormatSpec:
    """The spec of ``fmt``; TypeError naming any option that format does not take."""
    spec = FORMATS.get(fmt)
    unknown = sorted(set(options) - spec.options)
    if unknown:
        raise TypeError(f"format {fmt!r} does not take option(s) {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(spec.options))}")
    return spec


def export_model_dir(model_dir: str | Path, fmt: str, out: str | Path, **opts: Any) -> Path:
    """Load ``model_dir`` and export it as ``fmt`` (``onnx``, ``tensorrt``, ``aoti``) to ``out``.

    The artifact records the plan's provenance (FLOPs, params, plan hash, source dir, library
    versions) and is verified against the PyTorch model unless ``verify=False``.
    """
    spec = check_options(fmt, opts)
    model, plan = load_model_dir(model_dir)
    log.debug("exporting %s (%s) from %s as %s", plan.arch, "slim" if plan.kept else "base",
             model_dir, fmt)
    return spec.export(model, plan, Path(out), source=Path(model_dir), **opts)
