"""The stages as library functions: train a baseline, score it, prune it.

The CLI commands and the end-to-end ``run`` are thin layers over these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import time
from collections.abc import Mapping
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
    OutOfReach,
    allocate,
    cut,
    decided,
    load_allocator,
    rounding_note,
    select_crucial,
    whole_cost,
    with_rounding,
)
from deploy_prune.artifacts import (
    ModelPlan,
    NonFiniteError,
    check_model_size,
    load_model_dir,
    read_json_object,
    versions,
    weights_digest,
)
from deploy_prune.checkpoint import Checkpointer
from deploy_prune.config import (
    DataConfig,
    RunConfig,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
)
from deploy_prune.data import DataBundle, stage_loader, stream_seed
from deploy_prune.flops import count
from deploy_prune.host import cpu_count
from deploy_prune.models import build_model, load_weights_file, zoo
from deploy_prune.models.tv import is_torchvision
from deploy_prune.nodes import Node, discover, kept_whole, last_node, stage_of, stem_of
from deploy_prune.precision import check_precision
from deploy_prune.preprocess import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from deploy_prune.scoring import SCORERS, Decision, Goal, ScoreContext, Scores, node_scores
from deploy_prune.surgery import widths
from deploy_prune.train import baseline_state, evaluate, resolve_device, steps_for, train_baseline
from deploy_prune.validate import validate_run_config
from deploy_prune.weights import load_into, read_state_dict

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
    if load >= cores and torch.get_num_threads() > 1:
        log.warning("this machine is busy (load %.1f on %d cores) and torch uses %d threads; with "
                    "threads=1 (a key=value override) a job often finishes sooner", load, cores,
                    torch.get_num_threads())


def resolve_config(base: ModelPlan | None, config: str | None, overrides: list[str] | None) -> RunConfig:
    """The config a model was made with <- ``--config FILE`` <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base.info.get("config", {})) if base else {}
    if config:
        data = merge(data, read_yaml(config))
    return validate_run_config(from_dict(RunConfig, merge(data, parse_overrides(overrides))))


# What a base directory fixes about its model: a config file given to a later stage does not
# change these (the dataset it was evaluated on and its preprocessing); key=value overrides do.
BASE_KEYS = {"model": ("arch", "kwargs", "weights"),
             "data": ("name", "root", "image_size", "resize", "interpolation", "mean", "std", "channels")}


def resolve_base_config(base: ModelPlan, config: str | None, overrides: list[str] | None) -> RunConfig:
    """Config for a stage working on a base directory: the base's own config <- ``config`` <-
    ``overrides``, except that the model and its data/preprocessing (:data:`BASE_KEYS`) stay the
    base's unless an override names them."""
    data: dict[str, Any] = dict(base.info.get("config", {}))
    data = merge(data, {"model": {"arch": base.arch, "kwargs": dict(base.arch_kwargs)}})
    if config:
        given = read_yaml(config)
        for section, keys in BASE_KEYS.items():
            mine = given.get(section)
            if isinstance(mine, dict):
                dropped = [k for k in keys if k in mine and mine[k] != data.get(section, {}).get(k)]
                if dropped:
                    log.info("%s: %s from the base directory, not the config file", section,
                             ", ".join(dropped))
                given[section] = {k: v for k, v in mine.items() if k not in keys}
        data = merge(data, given)
    return validate_run_config(from_dict(RunConfig, merge(data, parse_overrides(overrides))))


def new_base_plan(cfg: RunConfig, data: DataBundle, *, num_classes: int | None = None) -> ModelPlan:
    plan = ModelPlan(arch=cfg.model.arch, arch_kwargs=dict(cfg.model.kwargs),
                     num_classes=num_classes or data.num_classes, in_channels=data.in_channels,
                     input_size=data.image_size)
    if data.preprocess is not None:  # spelled out for people and tools; data.* in config is the source
        plan.info["preprocess"] = data.preprocess.to_json()
    return plan


def import_overrides(arch: str, data_cfg: DataConfig) -> list[str]:
    """torchvision models default to their ImageNet recipe: 224 crop of a 256 resize (scaled with
    ``image_size``), ImageNet mean/std, 3 channels; timm models to their ``pretrained_cfg``'s
    (mean/std, crop fraction, resize filter; ImageNet's where it records none). The caller's own
    settings win."""
    timm = zoo.is_timm(arch)
    if not (is_torchvision(arch) or timm):
        return []
    cfg = zoo.pretrained_defaults(arch) if timm else {}
    size = data_cfg.image_size or cfg.get("input_size", 224)
    out = [f"data.image_size={size}"]
    if data_cfg.resize is None:
        out.append(f"data.resize={round(size / cfg.get('crop_pct', CROP_RATIO))}")
    if "interpolation" in cfg and data_cfg.interpolation == DataConfig.interpolation:  # at its default
        out.append(f"data.interpolation={cfg['interpolation']}")
    if data_cfg.channels is None:
        out.append("data.channels=3")
    if data_cfg.mean is None and data_cfg.channels in (None, 3):
        out += [f"data.mean={list(cfg.get('mean', IMAGENET_MEAN))}",
                f"data.std={list(cfg.get('std', IMAGENET_STD))}"]
    return out


def import_base(cfg: RunConfig, data: DataBundle, device: torch.device, *, weights: str | Path,
                state: Mapping[str, torch.Tensor] | None = None,
                num_classes: int | None = None) -> tuple[nn.Module, ModelPlan, dict]:
    """Build ``cfg.model.arch``, load the user's ``weights`` file (or its already read ``state``)
    and evaluate it on ``data``'s test split."""
    if num_classes is not None and num_classes < data.num_classes:
        raise ValueError(f"--num-classes {num_classes}: the data has {data.num_classes} classes")
    plan = new_base_plan(cfg, data, num_classes=num_classes)
    model = build_model(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels, **plan.arch_kwargs)
    load_into(model, state if state is not None else read_state_dict(weights), source=weights, arch=plan.arch)
    model.eval()
    try:
        with torch.no_grad():
            model(plan.example())
    except RuntimeError as e:
        raise ValueError(f"{plan.arch} does not run on a {tuple(plan.example().shape)} input "
                         f"({str(e).splitlines()[0][:160]}); try a larger --input-size") from None
    cost = describe(model, plan)
    metrics = evaluate(model, data.test, device)
    model.cpu().eval()
    plan.info.update(config=to_dict(cfg), metrics=metrics, imported_from=str(weights),
                     weights_sha256=file_sha256(weights), **cost)
    return model, plan, metrics


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    check_model_size(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels,
                     source="model.kwargs", **plan.arch_kwargs)
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
    if not all(np.isfinite(v) for v in metrics.values()):
        raise NonFiniteError(f"train: the trained model's test loss is {metrics['loss']} after "
                             f"{cfg.train.epochs} epoch(s): it diverged (lower train.lr); nothing saved")
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
    weights = weights_digest(model.state_dict())  # the weights the scores are learnt on
    seed_stage(cfg.seed, "score")
    ctx = score_context(model, plan, cfg, data, device, method=method, checkpoint=checkpoint)
    t0 = time.perf_counter() if started is None else started
    scores = scorer.score(ctx)
    model.cpu()
    seconds = time.perf_counter() - t0
    check_finite_scores(scores, f"{method} scores")
    out = {"format": SCORES_FORMAT, "scorer": method, "base_sha256": plan.digest(),
           "weights_sha256": weights, "seconds": seconds,
           "nodes": [{"name": n.name, "channels": n.channels, "junction": n.is_junction,
                      "prunable": n.prunable} for n in ctx.nodes],
           "node_scores": node_scores(scores),
           "channel_scores": {k: [float(x) for x in v] for k, v in scores.items()}}
    if scorer.decision is not None:
        out["decision"] = scorer.decision.to_json()
    return out


def check_finite_scores(scores: Scores, what: str) -> None:
    """Refuse channel scores with a NaN or infinite value (they would give arbitrary widths)."""
    for k, v in scores.items():
        a = np.asarray(v, dtype=np.float64)
        if not np.isfinite(a).all():
            raise NonFiniteError(f"{what}: {int((~np.isfinite(a)).sum())} of {a.size} scores of node "
                                 f"{k} are NaN or infinite; refusing them")


def read_scores(path: str | Path, plan: ModelPlan, model: nn.Module | None = None) -> Scores:
    """Load a scores JSON and check it belongs to this base model (and, given ``model``, to
    these very weights)."""
    return scores_from(read_json_object(path, finite=True, max_bytes=256 << 20), plan, source=path,
                       model=model)


def scores_from(data: dict, plan: ModelPlan, *, source: str | Path, model: nn.Module | None = None) -> Scores:
    """The channel scores of a parsed scores JSON (read from ``source``), checked against ``plan``
    and, given ``model``, against the hash of the weights they were learnt on."""
    if data.get("format") != SCORES_FORMAT:
        raise ValueError(f"{source}: not a deploy-prune scores file")
    if data.get("base_sha256") != plan.digest():
        raise ValueError(f"{source}: these scores were computed for another model (base hash differs)")
    if model is not None:
        learnt_on = data.get("weights_sha256")
        if learnt_on is None:
            raise ValueError(f"{source}: these scores do not record the weights they were learnt on "
                             "(weights_sha256); score this model again")
        if learnt_on != weights_digest(model.state_dict()):
            raise ValueError(f"{source}: these scores were learnt on other weights of the same "
                             "architecture (weights_sha256 differs); score this model")
    raw = data.get("channel_scores")
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"{source}: channel_scores must map node names to lists of numbers")
    try:
        scores = {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{source}: channel_scores must map node names to lists of numbers") from None
    check_finite_scores(scores, str(source))
    return scores


def decision_from(data: dict, *, source: str | Path) -> Decision | None:
    """The widths a scorer decided (scores JSON ``decision``), or None when it left them to the
    allocation."""
    return Decision.from_json(data["decision"], source=str(source)) if "decision" in data else None


def scored(data: dict, plan: ModelPlan, *, source: str | Path,
           model: nn.Module | None = None) -> tuple[Scores, Decision | None]:
    """Scores and decision of a parsed scores JSON (or of :func:`score`'s result): what
    :func:`prune` takes. Given ``model``, the scores must have been learnt on its weights."""
    return scores_from(data, plan, source=source, model=model), decision_from(data, source=source)


def read_scored(path: str | Path, plan: ModelPlan,
                model: nn.Module | None = None) -> tuple[Scores, Decision | None]:
    """:func:`scored` of a scores file (strict JSON: NaN/Infinity refused; at most 256 MiB)."""
    return scored(read_json_object(path, finite=True, max_bytes=256 << 20), plan, source=path, model=model)


@dataclass
class PruneResult:
    slim: nn.Module
    plan: ModelPlan
    allocation: Allocation
    nodes: list[Node]


def normalized(cfg: RunConfig, scorer: str | None = None) -> RunConfig:
    """``cfg`` with ``allocation.normalize=auto`` resolved for the scorer that made the scores
    (``scorer``, else ``scoring.method``): what it declares (:attr:`Scorer.normalize`)."""
    if cfg.allocation.normalize != "auto":
        return cfg
    name = scorer or cfg.scoring.method
    how = SCORERS.get(name).normalize if name in SCORERS.names() else "none"
    return dataclasses.replace(cfg, allocation=dataclasses.replace(cfg.allocation, normalize=how))


def prune(model: nn.Module, plan: ModelPlan, cfg: RunConfig, scores: Scores, *,
          selection: Scores | None = None, crucial: list[str] | None = None,
          decision: Decision | None = None, scorer: str | None = None) -> PruneResult:
    """Crucial nodes, global allocation and surgery; the base ``model`` is left untouched.

    With a ``decision`` (RBP's), its crucial nodes and widths are taken as they are, filled by
    ``scores``; otherwise the allocation derives them from the scores for ``cfg.allocation``.
    ``scorer``: the scorer that made ``scores`` when it is not ``cfg.scoring.method`` (it
    decides ``allocation.normalize=auto``).
    """
    asked, cfg = cfg, normalized(cfg, scorer)  # plan.json keeps the config as asked (auto stays auto)
    example = plan.example()
    model = model.cpu().eval()
    nodes = discover(model, example)
    missing = [n.name for n in nodes if n.name not in scores or len(scores[n.name]) != n.channels]
    if missing:
        raise ValueError(f"scores do not cover nodes {missing[:4]} of this model")
    check_finite_scores(scores, "scores")
    if selection is not None:
        check_finite_scores(selection, "selection scores")
    alloc = _allocation(model, plan, nodes, cfg, scores, selection=selection, crucial=crucial,
                        decision=decision)
    crucial = alloc.crucial
    slim = cut(model, alloc.plan, example, nodes=nodes).eval()
    slim_plan = ModelPlan(arch=plan.arch, arch_kwargs=plan.arch_kwargs, num_classes=plan.num_classes,
                          in_channels=plan.in_channels, input_size=plan.input_size, kept=alloc.plan)
    slim_plan.info.update(
        config=to_dict(asked), normalize=cfg.allocation.normalize, base_sha256=plan.digest(), crucial_nodes=crucial,
        flops=alloc.flops, params=alloc.params, base_flops=alloc.base_flops, base_params=alloc.base_params,
        flops_reduction=alloc.flops_reduction, widths=widths(nodes, alloc.plan),
        base_widths=widths(nodes), **_notes(plan), rounding=rounding_note(cfg.allocation, alloc.extra.pop("round_to", None)),
        versions=versions(), **alloc.extra)
    if "preprocess" in plan.info:
        slim_plan.info["preprocess"] = plan.info["preprocess"]
    return PruneResult(slim=slim, plan=slim_plan, allocation=alloc, nodes=nodes)


def _notes(plan: ModelPlan) -> dict[str, Any]:
    """Facts about how the model was built that matter for deployment (aux heads dropped)."""
    from deploy_prune.models.tv import aux_note

    note = aux_note(plan.arch, plan.arch_kwargs)
    return {"aux_heads": note} if note else {}


def _allocation(model: nn.Module, plan: ModelPlan, nodes: list[Node], cfg: RunConfig, scores: Scores, *,
                selection: Scores | None, crucial: list[str] | None, decision: Decision | None) -> Allocation:
    """A scorer's decision as it is, or the allocation to ``cfg.allocation``'s target."""
    example = plan.example()
    if decision is not None:
        log.info("widths as %s decided them (allocation.target=%s not searched)", decision.by,
                 cfg.allocation.target)
        return decided(model, nodes, scores, example, decision)
    per_stage = cfg.crucial.select == "per_stage" and not crucial and not cfg.crucial.nodes
    stages = stage_of(model, nodes, example) if per_stage else None
    stem = stem_of(model, nodes, example) if per_stage and not cfg.crucial.stem else None
    if not crucial:
        cost = None
        if cfg.crucial.cost and not cfg.crucial.nodes:
            cost = whole_cost(model, nodes, scores, example, keep=[last_node(nodes).name], cfg=cfg.allocation,
                              selection=selection, marginal=per_stage)  # select=score: only what fits
        crucial = select_crucial(nodes, scores, n=cfg.crucial.n, names=cfg.crucial.nodes, select=cfg.crucial.select,
                                 stages=stages, stem=stem, cost=cost)
        if cost is not None and per_stage:
            shares = [cost(k, tuple(crucial[:i])) for i, k in enumerate(crucial)]
            log.info("crucial nodes %s: kept whole they take %.2f of the slim model's FLOPs budget (%s)",
                     ", ".join(crucial), sum(shares), ", ".join(f"{k} +{c:.2f}" for k, c in zip(crucial, shares)))
    if cfg.allocation.target in PLUGIN_TARGETS:  # measured targets: the bench plugin allocator
        check_precision(cfg.allocation.precision, key="allocation.precision")
        # timings differ per rank, so rank 0 measures and every rank takes its widths (DDP
        # needs identical shapes on every rank)
        return distributed.from_main(lambda: load_allocator(cfg.allocation.target).allocate(
            model, nodes, scores, example, crucial=crucial, cfg=with_rounding(cfg.allocation)[0], plan=plan,
            selection=selection))
    try:
        return allocate(model, nodes, scores, example, crucial=crucial, cfg=cfg.allocation, selection=selection)
    except OutOfReach as e:
        msg = str(e)
        whole = kept_whole(nodes)  # the cause, when nodes the tracer ties together are kept whole
        if whole and "kept whole" not in msg:
            msg = f"{msg}; {whole}"
        if "out of reach" in msg:  # name the crucial nodes: on a net of few (tied) nodes they are most of it
            msg += (f"; crucial nodes, kept whole: {', '.join(crucial)} ({len(crucial)} of {len(nodes)} nodes; "
                    "crucial.n / crucial.nodes choose them)")
        raise OutOfReach(msg) from None


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

