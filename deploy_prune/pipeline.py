"""The stages as library functions: train a baseline, score it, prune it.

The CLI commands and the end-to-end ``run`` are thin layers over these.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy_prune import distributed
from deploy_prune.allocation import (
    PLUGIN_TARGETS,
    Allocation,
    allocate,
    cut,
    decided,
    load_allocator,
    select_crucial,
)
from deploy_prune.artifacts import ModelPlan, load_model_dir, read_json_object, versions
from deploy_prune.checkpoint import Checkpointer
from deploy_prune.config import RunConfig, from_dict, merge, parse_overrides, read_yaml, to_dict
from deploy_prune.data import DataBundle, stage_loader, stream_seed
from deploy_prune.flops import count
from deploy_prune.host import cpu_count
from deploy_prune.models import build_model, load_weights_file
from deploy_prune.nodes import Node, discover
from deploy_prune.precision import check_precision
from deploy_prune.scoring import SCORERS, Decision, Goal, ScoreContext, Scores, node_scores
from deploy_prune.surgery import widths
from deploy_prune.train import baseline_state, evaluate, resolve_device, steps_for, train_baseline

log = logging.getLogger(__name__)
SCORES_FORMAT = "deploy-prune/scores@1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_stage(seed: int, stage: str) -> None:
    """Seed the global generators for one stage from (seed, stage) alone, so a stage's result
    does not depend on what ran before it in the process (``train`` vs ``run``). Base training
    keeps the plain seed, so a base trained before this existed is trained again bit for bit."""
    seed_everything(seed if stage == "base" else stream_seed(seed, stage, 0) % 2**32)


def passes(epochs: float, loader) -> int:
    """Epochs of the data stream a stage of ``epochs`` (fractions allowed) starts: its data use."""
    return 0 if epochs <= 0 else -(-steps_for(epochs, loader) // max(1, len(loader)))


def first_epochs(cfg: RunConfig, loader, *, trained: bool) -> dict[str, int]:
    """Where on the training data stream each stage starts: after the epochs its predecessors use.

    The stages read one stream of epochs (each shuffled from the seed and its index): base
    training takes the first ``train.epochs``, beta scoring the next, then recovery, then
    fine-tuning. Computed from the config alone, so ``score`` on a base made by ``train`` reads
    the batches that ``run`` gives its score stage, and a resumed stage reads the same as before.
    ``trained``: the base was trained by deploy-prune from this config (else scoring starts at 0).
    """
    def sized(batch_size: int | None):
        return loader.with_options(batch_size=batch_size) if batch_size and hasattr(loader, "with_options") \
            else loader

    score = passes(cfg.train.epochs, loader) if trained else 0
    used_by_scoring = passes(cfg.scoring.epochs, sized(cfg.scoring.batch_size)) \
        if cfg.scoring.method == "beta" else 0
    recover = score + used_by_scoring
    rc = cfg.recovery
    used_by_recovery = passes(rc.epochs, sized(rc.batch_size)) if rc.mode in ("onestep", "ce") else 0
    return {"base": 0, "score": score, "recover": recover, "finetune": recover + used_by_recovery}


def trained_here(plan: ModelPlan) -> bool:
    """Whether deploy-prune trained this base (``train`` or ``run``), so its config's epochs count."""
    return "train_seconds" in plan.info and plan.info.get("config", {}).get("train", {}).get("epochs", 0) > 0


def setup(cfg: RunConfig) -> torch.device:
    """Seed, pin CPU threads (recorded for reproducibility) and pick the device."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        warn_if_busy()
    return resolve_device(cfg.device)


def warn_if_busy() -> None:
    """Say how to set the thread count when other work already fills the cores.

    The default stays torch's (one thread per core) rather than following the load, since the
    thread count can change the last bits of a float sum and a run should not depend on load.
    """
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], cpu_count()
    if load >= cores:
        log.warning("this machine is busy (load %.1f on %d cores) and torch uses %d threads; with "
                    "threads=1 (a key=value override) a job often finishes sooner", load, cores,
                    torch.get_num_threads())


def resolve_config(base: ModelPlan | None, config: str | None, overrides: list[str] | None) -> RunConfig:
    """The config a model was made with <- ``--config FILE`` <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base.info.get("config", {})) if base else {}
    if config:
        data = merge(data, read_yaml(config))
    return from_dict(RunConfig, merge(data, parse_overrides(overrides)))


def new_base_plan(cfg: RunConfig, data: DataBundle) -> ModelPlan:
    return ModelPlan(arch=cfg.model.arch, arch_kwargs=dict(cfg.model.kwargs), num_classes=data.num_classes,
                     in_channels=data.in_channels, input_size=data.image_size)


def describe(model: nn.Module, plan: ModelPlan, nodes: list[Node] | None = None) -> dict[str, Any]:
    """FLOPs, params and per-node widths, for plan.json and ``inspect``."""
    example = plan.example()
    nodes = nodes or discover(model, example)
    cost = count(model, example)
    return {"flops": cost.flops, "params": cost.params,
            "widths": {n.name: n.channels for n in nodes}}


def train_base(cfg: RunConfig, data: DataBundle, device: torch.device, *, checkpoint: Path | None = None,
               started: float | None = None) -> tuple[nn.Module, ModelPlan, dict]:
    """Build (and load local weights, if given) then train the baseline; evaluate it.

    The result depends only on the config and seed: ``train`` and ``run`` give the same weights.
    With ``checkpoint``, training saves there mid-way and resumes from it when it exists.
    """
    t0 = time.perf_counter() if started is None else started
    seed_stage(cfg.seed, "base")
    plan = new_base_plan(cfg, data)
    model = build_model(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels, **plan.arch_kwargs)
    if cfg.model.weights:
        load_weights_file(model, cfg.model.weights)
    ck = None
    if cfg.train.epochs > 0:
        loader = stage_loader(data.train, first_epoch=0)
        state = baseline_state(model.to(device), loader, cfg.train)
        if checkpoint is not None:
            ck = Checkpointer(checkpoint, {"model": model}, state, started=t0)
            ck.restore()
        train_baseline(model, loader, cfg.train, device=device, state=state,
                       on_step=ck.save if ck else None)
    seconds = ck.seconds() if ck else time.perf_counter() - t0
    metrics = evaluate(model, data.test, device)
    model.cpu().eval()
    plan.info.update(config=to_dict(cfg), metrics=metrics, train_seconds=seconds, **describe(model, plan))
    return model, plan, metrics


def score_context(model: nn.Module, plan: ModelPlan, cfg: RunConfig, data: DataBundle | None,
                  device: torch.device, *, method: str, checkpoint: Path | None = None) -> ScoreContext:
    """What the named scorer gets: its own config section, the run's goal, the batched loader
    (the training stream from where scoring starts on it, :func:`first_epochs`)."""
    example = plan.example()
    loader = None
    if data is not None:
        first = first_epochs(cfg, data.train, trained=trained_here(plan))["score"]
        loader = stage_loader(data.train, batch_size=cfg.scoring.batch_size, first_epoch=first)
    return ScoreContext(model=model, nodes=discover(model, example), example=example,
                        cfg=SCORERS.get(method).config_of(cfg), train_loader=loader, device=device,
                        seed=cfg.seed, goal=Goal.of(cfg), checkpoint=checkpoint)


def score(model: nn.Module, plan: ModelPlan, cfg: RunConfig, data: DataBundle | None,
          device: torch.device, *, method: str | None = None, checkpoint: Path | None = None,
          started: float | None = None) -> dict[str, Any]:
    """Channel and node scores of ``model`` by the named scorer, as a JSON-ready dict (with the
    widths it decided, under ``decision``, when the scorer decides them: RBP).

    Seeded from (seed, "score") and fed from where the config puts scoring on the data stream,
    so ``score`` and ``run`` give the same scores; a scorer that trains may checkpoint to
    ``checkpoint`` and resume from it.
    """
    method = method or cfg.scoring.method
    scorer = SCORERS.get(method)()
    seed_stage(cfg.seed, "score")
    ctx = score_context(model, plan, cfg, data, device, method=method, checkpoint=checkpoint)
    t0 = time.perf_counter() if started is None else started
    scores = scorer.score(ctx)
    model.cpu()
    seconds = time.perf_counter() - t0
    out = {"format": SCORES_FORMAT, "scorer": method, "base_sha256": plan.digest(), "seconds": seconds,
           "nodes": [{"name": n.name, "channels": n.channels, "junction": n.is_junction,
                      "prunable": n.prunable} for n in ctx.nodes],
           "node_scores": node_scores(scores),
           "channel_scores": {k: [float(x) for x in v] for k, v in scores.items()}}
    if scorer.decision is not None:
        out["decision"] = scorer.decision.to_json()
    return out


def read_scores(path: str | Path, plan: ModelPlan) -> Scores:
    """Load a scores JSON and check it belongs to this base model."""
    return scores_from(read_json_object(path), plan, source=path)


def scores_from(data: dict, plan: ModelPlan, *, source: str | Path) -> Scores:
    """The channel scores of a parsed scores JSON (read from ``source``), checked against ``plan``."""
    if data.get("format") != SCORES_FORMAT:
        raise ValueError(f"{source}: not a deploy-prune scores file")
    if data.get("base_sha256") != plan.digest():
        raise ValueError(f"{source}: these scores were computed for another model (base hash differs)")
    return {k: np.asarray(v, dtype=np.float64) for k, v in data["channel_scores"].items()}


def decision_from(data: dict, *, source: str | Path) -> Decision | None:
    """The widths a scorer decided (scores JSON ``decision``), or None when it left them to the
    allocation."""
    return Decision.from_json(data["decision"], source=str(source)) if "decision" in data else None


def scored(data: dict, plan: ModelPlan, *, source: str | Path) -> tuple[Scores, Decision | None]:
    """Scores and decision of a parsed scores JSON (or of :func:`score`'s result): what
    :func:`prune` takes."""
    return scores_from(data, plan, source=source), decision_from(data, source=source)


def read_scored(path: str | Path, plan: ModelPlan) -> tuple[Scores, Decision | None]:
    """:func:`scored` of a scores file."""
    return scored(read_json_object(path), plan, source=path)


@dataclass
class PruneResult:
    slim: nn.Module
    plan: ModelPlan
    allocation: Allocation
    nodes: list[Node]


def prune(model: nn.Module, plan: ModelPlan, cfg: RunConfig, scores: Scores, *,
          selection: Scores | None = None, crucial: list[str] | None = None,
          decision: Decision | None = None) -> PruneResult:
    """Crucial nodes, global allocation and surgery; the base ``model`` is left untouched.

    With a ``decision`` (RBP's), its crucial nodes and widths are taken as they are, filled by
    ``scores``; otherwise the allocation derives them from the scores for ``cfg.allocation``.
    """
    example = plan.example()
    model = model.cpu().eval()
    nodes = discover(model, example)
    missing = [n.name for n in nodes if n.name not in scores or len(scores[n.name]) != n.channels]
    if missing:
        raise ValueError(f"scores do not cover nodes {missing[:4]} of this model")
    alloc = _allocation(model, plan, nodes, cfg, scores, selection=selection, crucial=crucial,
                        decision=decision)
    crucial = alloc.crucial
    slim = cut(model, alloc.plan, example).eval()
    slim_plan = ModelPlan(arch=plan.arch, arch_kwargs=plan.arch_kwargs, num_classes=plan.num_classes,
                          in_channels=plan.in_channels, input_size=plan.input_size, kept=alloc.plan)
    slim_plan.info.update(
        config=to_dict(cfg), base_sha256=plan.digest(), crucial_nodes=crucial,
        flops=alloc.flops, params=alloc.params, base_flops=alloc.base_flops, base_params=alloc.base_params,
        flops_reduction=alloc.flops_reduction, widths=widths(nodes, alloc.plan),
        base_widths=widths(nodes), versions=versions(), **alloc.extra)
    return PruneResult(slim=slim, plan=slim_plan, allocation=alloc, nodes=nodes)


def _allocation(model: nn.Module, plan: ModelPlan, nodes: list[Node], cfg: RunConfig, scores: Scores, *,
                selection: Scores | None, crucial: list[str] | None, decision: Decision | None) -> Allocation:
    """A scorer's decision as it is, or the allocation to ``cfg.allocation``'s target."""
    example = plan.example()
    if decision is not None:
        log.info("widths as %s decided them (allocation.target=%s not searched)", decision.by,
                 cfg.allocation.target)
        return decided(model, nodes, scores, example, decision)
    crucial = crucial or select_crucial(nodes, scores, n=cfg.crucial.n, names=cfg.crucial.nodes)
    if cfg.allocation.target in PLUGIN_TARGETS:  # measured targets: the bench plugin allocator
        check_precision(cfg.allocation.precision, key="allocation.precision")
        # timings differ per rank, so rank 0 measures and every rank takes its widths (DDP
        # needs identical shapes on every rank)
        return distributed.from_main(lambda: load_allocator(cfg.allocation.target).allocate(
            model, nodes, scores, example, crucial=crucial, cfg=cfg.allocation, plan=plan,
            selection=selection))
    return allocate(model, nodes, scores, example, crucial=crucial, cfg=cfg.allocation, selection=selection)


def load_base(path: str | Path) -> tuple[nn.Module, ModelPlan]:
    model, plan = load_model_dir(path)
    if plan.kept:
        log.warning("%s is already pruned; pruning it again treats it as the base", path)
    return model, plan


def width_table(nodes: list[Node], base: dict[str, int], slim: dict[str, int], crucial: list[str]) -> str:
    """A readable per-node width table."""
    lines = [f"{'node':<32} {'base':>6} {'slim':>6} {'kept':>7}  note", "-" * 62]
    for n in nodes:
        note = "crucial" if n.name in crucial else ("fixed" if not n.prunable else "")
        b, s = base[n.name], slim[n.name]
        lines.append(f"{n.name:<32} {b:>6} {s:>6} {100 * s / b:>6.1f}%  {note}".rstrip())
    return "\n".join(lines)

