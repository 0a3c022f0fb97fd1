"""Model directories for ``bench suite``: the base model and each operating point's slim model.

Random weights: latency does not depend on weight values, so the ImageNet-shape models need no
checkpoint to be timed. Widths come from beta scores when an ImageNet folder is given
(``data_root``), otherwise from the ``uniform`` allocation of the ``first_k`` scorer: the same
fraction removed from every prunable node, solved for the FLOPs target on the real cut model.
Slim models are made by ``pipeline.score`` and ``pipeline.prune``, as the CLI makes them.
Directories are cached: a rerun finds them and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bench.studies.paper_claims.config import PointConfig, SuiteConfig
from deploy_prune import pipeline
from deploy_prune.artifacts import PLAN_FILE, ModelPlan, inside, save_model_dir
from deploy_prune.config import (
    AllocationConfig,
    CrucialConfig,
    DataConfig,
    RunConfig,
    ScoringConfig,
)
from deploy_prune.models import build_model
from deploy_prune.nodes import discover, last_node

log = logging.getLogger(__name__)


ONNX_FILE = "model.onnx"  # the ort backend's export, kept beside the weights so reruns skip it


def onnx_matches(onnx_path: Path, model_dir: Path) -> bool:
    """Whether a cached ONNX file was exported from this directory's model: its metadata's
    plan_sha256 (and weights_sha256, when recorded) equal the directory's plan."""
    from deploy_prune.artifacts import read_plan
    from export.onnx_files import check_data_file
    from export.to_onnx import read_metadata

    plan = read_plan(model_dir)
    try:
        meta = read_metadata(onnx_path)
        check_data_file(onnx_path)  # a model past 2 GiB is only whole with its NAME.onnx.data
    except (ValueError, FileNotFoundError):  # a truncated or foreign file: not ours, export again
        return False
    if meta.get("plan_sha256") != plan.digest():
        return False
    weights = plan.info.get("weights_sha256")
    return weights is None or meta.get("weights_sha256") in (None, weights)


def ensure_onnx(model_dir: Path) -> Path:
    """``model_dir/model.onnx`` (fp32, dynamic batch, verified in ONNX Runtime), exported once.

    Exporting VGG-16 takes a minute on this class of machine; the suite's builder process does it
    ahead of the measurements, and the ``ort`` backend is handed the file (:func:`bench.studies.paper_claims.suite.prime`).
    """
    from bench.backends.onnx_cache import write_onnx
    from deploy_prune.artifacts import load_model_dir
    from export.onnx_files import remove_onnx
    from export.to_onnx import DEFAULT_OPSET

    out = model_dir / ONNX_FILE
    if out.is_file() and not onnx_matches(out, model_dir):
        log.warning("%s does not match %s/plan.json (plan or weights hash differs); exporting it again",
                    out, model_dir)
        remove_onnx(out)  # with its external-data file, if it has one
    if not out.is_file():
        model, plan = load_model_dir(model_dir)
        example = torch.randn(plan.example(2).shape, generator=torch.Generator().manual_seed(0))  # (2, C, H, W)
        write_onnx(model.eval(), plan, "base" if plan.kept is None else "slim", example, out, opset=DEFAULT_OPSET)
    return out


def width_source(cfg: SuiteConfig) -> str:
    """``beta`` with an ImageNet folder, else ``uniform``."""
    return "beta" if cfg.data_root else "uniform"


def base_dir(root: Path, arch: str) -> Path:
    return inside(root, root / "models" / f"{arch}-base")


def slim_dir(root: Path, point: PointConfig, rounding: int, source: str) -> Path:
    return inside(root, root / "models" / f"{point.name}-{source}-r{rounding}")


def _plan(cfg: SuiteConfig, arch: str, kept: dict[str, list[int]] | None, info: dict[str, Any]) -> ModelPlan:
    return ModelPlan(arch=arch, num_classes=cfg.num_classes, in_channels=cfg.in_channels,
                     input_size=cfg.input_size, kept=kept, info=info)


def _base_model(cfg: SuiteConfig, arch: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_model(arch, num_classes=cfg.num_classes, in_channels=cfg.in_channels).eval()


def ensure_base(root: Path, cfg: SuiteConfig, arch: str) -> Path:
    """The unpruned model directory of ``arch`` (random weights), built once."""
    out = base_dir(root, arch)
    if not (out / PLAN_FILE).is_file():
        log.info("building %s", out)
        save_model_dir(_base_model(cfg, arch), _plan(cfg, arch, None, {"weights": "random"}), out, force=True)
    return out


def build_slim(root: Path, cfg: SuiteConfig, point: PointConfig, rounding: int, *, onnx: bool) -> Path:
    """The slim directory and, when an ``ort`` stage will time it, its ONNX export (the builder's job)."""
    out = ensure_slim(root, cfg, point, rounding)
    if onnx:
        ensure_onnx(out)
    return out


def run_config(cfg: SuiteConfig, point: PointConfig, rounding: int, source: str) -> RunConfig:
    """The run config that prunes one operating point, as ``deploy-prune prune`` would take it:
    beta (the paper's ImageNet settings) or first-k scores, global or uniform allocation."""
    data = DataConfig(name="imagefolder", root=cfg.data_root, image_size=cfg.input_size,
                      batch_size=cfg.scoring_batch_size) if source == "beta" else DataConfig()
    scoring = ScoringConfig(method="beta", l1_lambda=0.1, lr=1e-4, epochs=cfg.scoring_epochs) \
        if source == "beta" else ScoringConfig(method="first_k")
    alloc = AllocationConfig(method="global" if source == "beta" else "uniform",
                             flops_reduction=point.flops_reduction, round_to=rounding,
                             min_fraction=cfg.min_fraction, tolerance=cfg.tolerance)
    crucial = CrucialConfig(nodes=list(point.crucial) if point.crucial else None)
    return RunConfig(seed=cfg.seed, device="cpu", data=data, scoring=scoring, crucial=crucial, allocation=alloc)


def ensure_slim(root: Path, cfg: SuiteConfig, point: PointConfig, rounding: int) -> Path:
    """The slim model directory of one operating point and rounding, built once, by the same
    score and prune as ``deploy-prune score`` / ``prune`` (so plan.json carries the same config,
    base hash and versions), plus the suite's own facts (operating point, rounding, source)."""
    source = width_source(cfg)
    out = slim_dir(root, point, rounding, source)
    if (out / PLAN_FILE).is_file():
        return out
    log.info("building %s", out)
    run_cfg = run_config(cfg, point, rounding, source)
    model, plan = _base_model(cfg, point.arch), _plan(cfg, point.arch, None, {"weights": "random"})
    data = None
    if source == "beta":
        from deploy_prune.data import load_data

        data = load_data(run_cfg.data, seed=cfg.seed)
    scored = pipeline.score(model, plan, run_cfg, data, torch.device("cpu"))
    scores, decision = pipeline.scored(scored, plan, source=f"{run_cfg.scoring.method} scores")
    # the paper's named crucial nodes (checked: a misspelt one is an error) plus the last conv
    # node; with none named, only the last conv node (the paper's uniform recipes narrow the rest)
    crucial = None if point.crucial else [last_node(discover(model, plan.example())).name]
    res = pipeline.prune(model, plan, run_cfg, scores, crucial=crucial, decision=decision)
    res.plan.info.update(weights="random", operating_point=point.name, source=point.source,
                         target_flops_reduction=point.flops_reduction, rounding=rounding,
                         width_source=source)
    save_model_dir(res.slim, res.plan, out, force=True)
    return out
