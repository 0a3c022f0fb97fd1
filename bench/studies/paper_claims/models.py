"""Model directories for ``bench suite``: the base model and each operating point's slim model.

Random weights: latency does not depend on weight values, so the ImageNet-shape models need no
checkpoint to be timed. Widths come from beta scores when an ImageNet folder is given
(``data_root``), otherwise from the ``uniform`` allocation: the same fraction removed from every
prunable node, solved for the FLOPs target on the real cut model. Directories are cached: a
rerun finds them and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.studies.paper_claims.config import PointConfig, SuiteConfig
from deploy_prune.allocation import allocate, cut, select_crucial
from deploy_prune.artifacts import PLAN_FILE, ModelPlan, save_model_dir
from deploy_prune.config import AllocationConfig, DataConfig, RunConfig, ScoringConfig
from deploy_prune.models import build_model
from deploy_prune.nodes import discover, last_node
from deploy_prune.scoring import SCORERS, ScoreContext, Scores

log = logging.getLogger(__name__)


ONNX_FILE = "model.onnx"  # the ort backend's export, kept beside the weights so reruns skip it


def ensure_onnx(model_dir: Path) -> Path:
    """``model_dir/model.onnx`` (fp32, dynamic batch, verified in ONNX Runtime), exported once.

    Exporting VGG-16 takes a minute on this class of machine; the suite's builder process does it
    ahead of the measurements, and the ``ort`` backend is handed the file (:func:`bench.studies.paper_claims.suite.prime`).
    """
    from bench.backends.ort import write_onnx
    from deploy_prune.artifacts import load_model_dir
    from export.to_onnx import DEFAULT_OPSET

    out = model_dir / ONNX_FILE
    if not out.is_file():
        model, plan = load_model_dir(model_dir)
        example = torch.randn(plan.example(2).shape, generator=torch.Generator().manual_seed(0))  # (2, C, H, W)
        write_onnx(model.eval(), plan, "base" if plan.kept is None else "slim", example, out, opset=DEFAULT_OPSET)
    return out


def width_source(cfg: SuiteConfig) -> str:
    """``beta`` with an ImageNet folder, else ``uniform``."""
    return "beta" if cfg.data_root else "uniform"


def base_dir(root: Path, arch: str) -> Path:
    return root / "models" / f"{arch}-base"


def slim_dir(root: Path, point: PointConfig, rounding: int, source: str) -> Path:
    return root / "models" / f"{point.name}-{source}-r{rounding}"


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


def uniform_scores(nodes: list) -> Scores:
    """Descending scores: the uniform allocation keeps each node's first channels."""
    return {n.name: np.linspace(1.0, 0.0, n.channels) for n in nodes}


def beta_scores(model: torch.nn.Module, nodes: list, example: torch.Tensor, cfg: SuiteConfig) -> Scores:
    """OSPR's beta scores (eq. 2-4) learnt on the ImageNet folder ``cfg.data_root``."""
    from deploy_prune.data import load_data

    data_cfg = DataConfig(name="imagefolder", root=cfg.data_root, image_size=cfg.input_size,
                          batch_size=cfg.scoring_batch_size)
    run_cfg = RunConfig(data=data_cfg, scoring=ScoringConfig(method="beta", l1_lambda=0.1, lr=1e-4,
                                                             epochs=cfg.scoring_epochs))
    data = load_data(data_cfg, seed=cfg.seed)
    ctx = ScoreContext(model=model, nodes=nodes, example=example, cfg=run_cfg, train_loader=data.train,
                       seed=cfg.seed)
    return SCORERS.get("beta")().score(ctx)


def ensure_slim(root: Path, cfg: SuiteConfig, point: PointConfig, rounding: int) -> Path:
    """The slim model directory of one operating point and rounding, built once."""
    source = width_source(cfg)
    out = slim_dir(root, point, rounding, source)
    if (out / PLAN_FILE).is_file():
        return out
    log.info("building %s", out)
    model = _base_model(cfg, point.arch)
    example = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)  # (1, C, H, W)
    nodes = discover(model, example)
    scores = beta_scores(model, nodes, example, cfg) if source == "beta" else uniform_scores(nodes)
    # the paper's named crucial nodes (checked: a misspelt one is an error), plus the last conv node
    crucial = select_crucial(nodes, scores, names=point.crucial) if point.crucial else [last_node(nodes).name]
    alloc_cfg = AllocationConfig(method="global" if source == "beta" else "uniform",
                                 flops_reduction=point.flops_reduction, round_to=rounding,
                                 min_fraction=cfg.min_fraction, tolerance=cfg.tolerance)
    alloc = allocate(model, nodes, scores, example, crucial=crucial, cfg=alloc_cfg)
    slim = cut(model, alloc.plan, example)
    info = {"weights": "random", "operating_point": point.name, "source": point.source,
            "target_flops_reduction": point.flops_reduction, "rounding": rounding, "width_source": source,
            "crucial_nodes": crucial, "flops": alloc.flops, "base_flops": alloc.base_flops,
            "flops_reduction": alloc.flops_reduction, "widths": alloc.counts}
    save_model_dir(slim, _plan(cfg, point.arch, alloc.plan, info), out, force=True)
    return out
