"""Peer study: deploy-prune's recipe against Torch-Pruning's own recipes, at equal epochs, on
several independently trained bases, at several FLOPs targets, with measured CPU speedups.

Per seed (one base each):

1. train the base with the config (``seed=S``), score it once with beta (the dp rows share it);
2. for every FLOPs target and every method, prune the base to that target, train the slim model
   for the same number of epochs, evaluate it and time it against the base in interleaved
   rounds (ONNX Runtime and torch eager, CPU, 1 thread, CPU clock: :mod:`bench.timing`);
3. append one row to ``seed{S}/rows.jsonl`` (an interrupted study resumes there).

Methods (``METHODS``): ``dp-*`` are deploy-prune recipes (beta scores, crucial nodes, global
allocation, one-step recovery, fine-tuning), differing only in the config overrides named.
``tp-*`` are Torch-Pruning's ``MetaPruner`` with global pruning and L1 / BN-scale / Taylor
importance, its pruning ratio searched to the same FLOPs target, then cross-entropy fine-tuning
with SGD + cosine (lr 0.01, as Torch-Pruning's benchmarks do) for the dp recipe's scoring +
recovery + fine-tuning epochs.

Equal latency: each method and seed has a frontier through (1x, base top-1) and its measured
(ORT speedup, top-1) points; a method's accuracy at another method's speedup is the best its
frontier offers at that speed or faster, by linear interpolation (never extrapolated past its
fastest point). ``report`` compares every dp method with each peer point on the same seed.

    python -m bench.studies.peers --out runs/peers --seeds 0 1 2 --targets 2 3 --set threads=1
    python -m bench.studies.peers --out runs/peers --report-only --page docs/results
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy_prune import pipeline
from deploy_prune.artifacts import ModelPlan, atomic_write_text, load_model_dir, save_model_dir
from deploy_prune.config import RunConfig, load_config
from deploy_prune.data import load_data, stage_loader
from deploy_prune.flops import count
from deploy_prune.recovery.mimic import finetune
from deploy_prune.run import recover_slim
from deploy_prune.train import evaluate, make_optimizer, make_scheduler, steps_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    kind: str  # dp | tp
    overrides: tuple[str, ...] = ()  # dp: config overrides
    importance: str = ""  # tp: l1 | bn | taylor
    label: str = ""


# deploy-prune's default recipe as the study runs it (configs/default.yaml's crucial.select and
# recovery terms, spelled out so a variant's change is the only difference)
RECIPE = ("crucial.select=per_stage", "recovery.ce_weight=1", "recovery.kd_weight=1")

METHODS: dict[str, Method] = {
    "dp-ospr": Method("dp", ("crucial.select=score", "crucial.cost=false", "recovery.ce_weight=0",
                             "recovery.kd_weight=0"),
                      label="deploy-prune, OSPR rule (top-N crucial, KL mimic)"),
    "dp-stage": Method("dp", ("crucial.select=per_stage", "recovery.ce_weight=0", "recovery.kd_weight=0"),
                       label="deploy-prune, one crucial node per stage, KL mimic"),
    "dp-kd": Method("dp", ("crucial.select=score", "crucial.cost=false", "recovery.ce_weight=1",
                           "recovery.kd_weight=1"),
                    label="deploy-prune, top-N crucial, KL mimic + CE + logit KD"),
    "dp-stage-kd": Method("dp", RECIPE,
                          label="deploy-prune, one crucial node per stage, KL mimic + CE + logit KD"),
    # the default recipe with widths in multiples of 8 (the default before round_to=auto, and what
    # auto picks on AVX2 CPUs and GPUs; auto is 16 on AVX-512)
    "dp-stage-kd-r8": Method("dp", (*RECIPE, "allocation.round_to=8"),
                             label="deploy-prune default recipe, widths in multiples of 8"),
    # ablation: dp-stage-kd with the peers' fine-tuning schedule (SGD, lr 0.01, cosine) in its own
    # fine-tuning epochs; same widths (same speed), same budget
    "dp-stage-kd-sgdft": Method("dp", (*RECIPE, "finetune.optimizer=sgd", "finetune.lr=0.01", "finetune.schedule=cosine"),
                                label="deploy-prune default recipe + SGD lr 0.01 cosine fine-tuning"),
    # screened candidates, each the default recipe with one or two changes (same widths, same budget)
    "dp-stage-kd-ftcos": Method("dp", (*RECIPE, "finetune.lr=0.001", "finetune.schedule=cosine"),
                                label="deploy-prune default recipe + Adam 1e-3 cosine fine-tuning"),
    "dp-stage-kd-unfrozen": Method("dp", (*RECIPE, "recovery.freeze_classifier=false"),
                                   label="deploy-prune default recipe, classifier trained in recovery"),
    "dp-stage-kd-rlr3": Method("dp", (*RECIPE, "recovery.lr=0.003"),
                               label="deploy-prune default recipe, recovery lr 3e-3"),
    "dp-stage-kd-unfrozen-ftcos": Method("dp", (*RECIPE, "recovery.freeze_classifier=false",
                                                "finetune.lr=0.001", "finetune.schedule=cosine"),
                                         label="deploy-prune default recipe, classifier trained in recovery, "
                                         "Adam 1e-3 cosine fine-tuning"),
    "dp-stage-kd-rlr03": Method("dp", (*RECIPE, "recovery.lr=0.0003"),
                                label="deploy-prune default recipe, recovery lr 3e-4"),
    "dp-stage-kd-noft": Method("dp", (*RECIPE, "recovery.epochs=1.5", "finetune.epochs=0"),
                               label="deploy-prune default recipe, the fine-tuning epochs spent on recovery "
                               "(equal budget at the page's 1.0 + 0.5 epochs)"),
    "dp-stage-kd-kd3": Method("dp", (*RECIPE, "recovery.kd_weight=3"),
                              label="deploy-prune default recipe, logit KD weight 3"),
    "dp-stage-kd-ftlow": Method("dp", (*RECIPE, "finetune.lr=0.00003"),
                                label="deploy-prune default recipe, fine-tuning Adam 3e-5"),
    "dp-stage-kd-kd3-unfrozen": Method("dp", (*RECIPE, "recovery.kd_weight=3",
                                              "recovery.freeze_classifier=false"),
                                       label="deploy-prune default recipe, logit KD weight 3, classifier trained"),
    "dp-stage-kd-ft3e4": Method("dp", (*RECIPE, "finetune.lr=0.0003"),
                                label="deploy-prune default recipe, fine-tuning Adam 3e-4"),
    # hypothesis test (small VGG only): the full-resolution stage's crucial node is features.3,
    # not the stem features.0 that beta picks on every base, so the stem can be cut
    "dp-stage-kd-nostem": Method("dp", ("crucial.nodes=[features.3, features.10]", "recovery.ce_weight=1",
                                        "recovery.kd_weight=1"),
                                 label="deploy-prune default recipe, crucial features.3/.10/.18 (stem cut)"),
    # ablation of the stem rule (crucial.stem=false is the default): per_stage may pick the stem
    "dp-stage-kd-stem": Method("dp", (*RECIPE, "crucial.stem=true"),
                               label="deploy-prune default recipe, but the stem may be crucial (before 2026-12-02)"),
    # ablation of the cost rule (crucial.cost=true is the default): each stage's crucial node by
    # beta score alone, whatever its whole width costs the slim model
    "dp-stage-kd-nocost": Method("dp", (*RECIPE, "crucial.cost=false"),
                                 label="deploy-prune default recipe, crucial nodes chosen without their cost "
                                 "(the default before 2026-12-02)"),
    "tp-l1": Method("tp", importance="l1", label="Torch-Pruning L1 (global) + CE fine-tune"),
    "tp-bn": Method("tp", importance="bn", label="Torch-Pruning BN-scale (global) + CE fine-tune"),
    "tp-taylor": Method("tp", importance="taylor", label="Torch-Pruning Taylor (global) + CE fine-tune"),
}
DEFAULT_METHODS = tuple(METHODS)
TP_LR = 0.01  # Torch-Pruning benchmarks' fine-tuning lr (SGD, momentum 0.9, wd 5e-4)


@dataclass
class Study:
    config: str | None = "configs/default.yaml"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    targets: list[float] = field(default_factory=lambda: [2.0, 3.0])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    timing: str = "quick"  # quick | none (none: no speed measurement, for tests)
    taylor_batches: int = 4


# ---------------------------------------------------------------------------------------------
# Torch-Pruning peers


def tp_importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"unknown Torch-Pruning importance {name!r}; expected l1, bn or taylor")


def taylor_grads(model: nn.Module, loader, batches: int) -> dict[str, torch.Tensor]:
    """Summed cross-entropy gradients over the first ``batches`` batches (Taylor importance)."""
    model.eval().zero_grad()
    for i, (xb, yb) in enumerate(loader):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(xb), yb).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def tp_prune(model: nn.Module, example: torch.Tensor, importance: str, ratio: float,
             grads: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's MetaPruner, global ranking, at ``ratio``."""
    import torch_pruning as tp

    m = copy.deepcopy(model).cpu().eval()
    if grads:  # deepcopy drops .grad: put the base's gradients back for Taylor
        for k, p in m.named_parameters():
            if k in grads:
                p.grad = grads[k].clone()
    heads = [x for x in m.modules() if isinstance(x, nn.Linear)]
    pruner = tp.pruner.MetaPruner(m, example, importance=tp_importance(importance), global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=heads)
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def tp_to_target(model: nn.Module, example: torch.Tensor, importance: str, target: float,
                 grads=None, *, tol: float = 0.02, iters: int = 14) -> tuple[nn.Module, float]:
    """Bisect Torch-Pruning's global pruning ratio until the FLOPs reduction meets ``target``."""
    base = count(model, example).flops
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = tp_prune(model, example, importance, mid, grads)
        red = base / max(count(m, example).flops, 1)
        if best is None or abs(red / target - 1) < abs(best[1] / target - 1):
            best = (m, red)
        if abs(red / target - 1) <= tol / 2:
            break
        lo, hi = (mid, hi) if red < target else (lo, mid)
    assert best is not None
    if abs(best[1] / target - 1) > tol:
        log.warning("Torch-Pruning %s reached %.2fx, not %.2fx", importance, best[1], target)
    return best


def ce_finetune(model: nn.Module, loader, epochs: float, device: torch.device) -> None:
    """Torch-Pruning's usual recovery: cross-entropy, SGD (momentum 0.9, wd 5e-4), cosine lr."""
    from deploy_prune.train import cross_entropy, fit

    model.to(device).train()
    steps = steps_for(epochs, loader)
    opt = make_optimizer(model.parameters(), name="sgd", lr=TP_LR, weight_decay=5e-4)
    sched = make_scheduler(opt, name="cosine", total_steps=steps, steps_per_epoch=len(loader))
    fit(model, loader, steps=steps, loss_fn=cross_entropy(), optimizer=opt, scheduler=sched, device=device,
        desc="tp-finetune")
    model.cpu().eval()


# ---------------------------------------------------------------------------------------------
# Timing (paired against the base, like every bench measurement)

TIMING_BACKENDS = ("ort", "torch")


class SpeedMeter:
    """Paired CPU speedups of slim models over one base, per backend (1 thread, CPU clock)."""

    def __init__(self, base: nn.Module, plan: ModelPlan, workdir: Path, *, enabled: bool = True) -> None:
        self.enabled, self.plan, self.workdir = enabled, plan, workdir
        self._n = 0
        self._cache: dict[tuple, dict[str, float]] = {}
        if not enabled:
            return
        from bench.backends import BACKENDS, BackendOptions
        from bench.timing import Timer, TimingConfig

        self.cfg = TimingConfig(warmup_s=0.2, warmup_iters=5, min_time_s=0.6, rounds=10, min_samples=60,
                                min_per_round=3, clock="cpu")
        self.options = BackendOptions(threads=1, max_batch=1)
        self.host = torch.randn(plan.example(1).shape, generator=torch.Generator().manual_seed(0))
        self.backends = {}
        for name in TIMING_BACKENDS:
            be = self._prepare(BACKENDS, name, "base", base)
            self.backends[name] = (be, Timer(be, self.host, clock="cpu"))

    def _prepare(self, registry, name: str, label: str, model: nn.Module):
        from bench.backends import Artifact

        wd = self.workdir / label / name
        wd.mkdir(parents=True, exist_ok=True)
        art = Artifact(name=label, path=wd, model=model.cpu().eval(), plan=self.plan, workdir=wd)
        be = registry.get(name)(device="cpu", precision="fp32", options=self.options)
        be.prepare(art, self.plan.example(1))
        return be

    def measure(self, slim: nn.Module) -> dict[str, float]:
        """Paired speedups per backend; slim models of one architecture (same widths) are timed
        once: their speed is the same, and re-timing would only add noise between them."""
        if not self.enabled:
            return {}
        key = tuple(tuple(p.shape) for p in slim.state_dict().values())
        if key not in self._cache:
            self._cache[key] = self._measure(slim)
        return dict(self._cache[key])

    def _measure(self, slim: nn.Module) -> dict[str, float]:
        from bench.backends import BACKENDS
        from bench.stats import paired_speedup
        from bench.timing import Timer, measure_pair

        self._n += 1
        out: dict[str, float] = {}
        for name, (_, base_timer) in self.backends.items():
            be = self._prepare(BACKENDS, name, f"slim{self._n}", slim)
            try:
                a, b = measure_pair(base_timer, Timer(be, self.host, clock="cpu"), self.cfg)
                s = paired_speedup(a.e2e_ms, b.e2e_ms, n_boot=1000)
                out.update({f"{name}_speedup": s.value, f"{name}_low": s.low, f"{name}_high": s.high})
            finally:
                be.close()
        return out

    def close(self) -> None:
        if self.enabled:
            for be, _ in self.backends.values():
                be.close()


# ---------------------------------------------------------------------------------------------
# One seed


# Nothing is pinned: the dp rows run the config as it is (configs/default.yaml: round_to=auto, the
# CPU's channel block, 16 on AVX-512, falling back to 8, 4, 2, 1 when the target is out of reach). Each row records the rounding its
# widths got (``round_to``). The peers keep Torch-Pruning's own default (``round_to=None``: exact).
TP_ROUND_TO = 1


def seed_config(study: Study, seed: int, extra: tuple[str, ...] = ()) -> RunConfig:
    return load_config(study.config, [*study.overrides, f"seed={seed}", *extra])


def budget(cfg: RunConfig) -> dict[str, float]:
    """The epochs the dp recipe spends (scoring + recovery + fine-tuning): the peers get as many."""
    return {"scoring": cfg.scoring.epochs, "recovery": cfg.recovery.epochs, "finetune": cfg.finetune.epochs,
            "total": cfg.scoring.epochs + cfg.recovery.epochs + cfg.finetune.epochs}


def run_seed(study: Study, seed: int, out: Path) -> list[dict[str, Any]]:
    sdir = out / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    rows_path = sdir / "rows.jsonl"
    done = {(r["method"], r["target"]): r for r in _read_jsonl(rows_path)}
    cfg = seed_config(study, seed)
    device = pipeline.setup(cfg)
    data = load_data(cfg.data, seed=seed)
    if (sdir / "base" / "plan.json").is_file():
        model, plan = load_model_dir(sdir / "base")
        base_top1 = float(plan.info["metrics"]["top1"])
    else:
        t0 = time.process_time()
        model, plan, metrics = pipeline.train_base(cfg, data, device)
        plan.info["train_cpu_seconds"] = time.process_time() - t0
        save_model_dir(model, plan, sdir / "base", force=True)
        base_top1 = metrics["top1"]
    example = plan.example()
    base_flops = count(model, example).flops
    scores_path = sdir / "scores.json"
    if scores_path.is_file():
        res = json.loads(scores_path.read_text())
    else:
        t0 = time.process_time()
        res = pipeline.score(model, plan, cfg, data, device)
        res["cpu_seconds"] = time.process_time() - t0
        atomic_write_text(scores_path, json.dumps(res))
    scores = pipeline.scores_from(res, plan, source=scores_path)
    # one export folder per process: two processes may share a seed (one target each)
    meter = SpeedMeter(model, plan, sdir / f"onnx-{os.getpid()}", enabled=study.timing != "none")
    rows = []
    try:
        for target in study.targets:
            for name in study.methods:
                if (name, target) in done:
                    rows.append(done[(name, target)])
                    continue
                log.info("peers: seed %d, %.2fx, %s", seed, target, name)
                row = one_row(study, name, seed, target, model, plan, data, device, scores)
                row.update(seed=seed, target=target, method=name, base_top1=base_top1, base_flops=base_flops,
                           **meter.measure(row.pop("_slim")))
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    finally:
        meter.close()
    return rows


def one_row(study: Study, name: str, seed: int, target: float, model: nn.Module, plan: ModelPlan, data, device,
            scores) -> dict[str, Any]:
    if name not in METHODS:
        raise ValueError(f"unknown peer method {name!r}; expected one of {', '.join(METHODS)}")
    method = METHODS[name]
    cfg = seed_config(study, seed, (*method.overrides, f"allocation.flops_reduction={target}",
                                    "allocation.target=flops"))
    example = plan.example()
    # Every method reads the training stream where `deploy-prune run` reads it after the base
    # (pipeline.first_epochs): dp's recovery and fine-tuning exactly as run's stages (same seeds,
    # same batches), the peers' fine-tuning from where scoring starts, i.e. the same fresh epochs.
    first = pipeline.first_epochs(cfg, data.train, trained=pipeline.trained_here(plan))
    b = budget(cfg)
    t0 = time.process_time()
    if method.kind == "dp":
        res = pipeline.prune(model, plan, cfg, scores)
        slim, crucial = res.slim, res.plan.info["crucial_nodes"]
        pipeline.seed_stage(seed, "recover")
        loader = stage_loader(data.train, batch_size=cfg.recovery.batch_size, first_epoch=first["recover"])
        slim, _ = recover_slim(model, slim, res.plan, cfg, loader, device)
        if cfg.finetune.epochs > 0:
            pipeline.seed_stage(seed, "finetune")
            loader = stage_loader(data.train, first_epoch=first["finetune"])
            finetune(slim, loader=loader, cfg=cfg.finetune, device=device)
        slim.cpu().eval()
        model.cpu()
        rounding = res.plan.info.get("rounding", {})
        epochs, extra = b["recovery"] + b["finetune"], {"crucial": crucial,
                                                        "round_to": int(rounding.get("round_to", 1))}
        cpu = time.process_time() - t0
    else:
        pipeline.seed_stage(seed, "tp-finetune")
        loader = stage_loader(data.train, first_epoch=first["score"])
        grads = taylor_grads(copy.deepcopy(model), loader, study.taylor_batches) \
            if method.importance == "taylor" else None
        slim, _ = tp_to_target(model, example, method.importance, target, grads)
        ce_finetune(slim, loader, b["total"], device)
        epochs, extra = b["total"], {"crucial": [], "round_to": TP_ROUND_TO}
        cpu = time.process_time() - t0
    top1 = evaluate(slim.to(device), data.test, device)["top1"]
    slim.cpu().eval()
    flops = count(slim, example).flops
    widths = [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)]
    return {"top1": top1, "flops": flops, "epochs": epochs, "cpu_seconds": cpu, "widths": widths,
            "kind": method.kind, **extra, "_slim": slim}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------
# Report: table, equal-latency comparison, plot, page


def load_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(out.glob("seed*/rows.jsonl")):
        rows += _read_jsonl(p)
    return rows


def frontier_at(points: list[tuple[float, float]], s: float) -> float:
    """The best top-1 a method offers at speedup ``s`` or faster: the maximum of its frontier
    (linear interpolation between its sorted (speedup, top-1) points) over speedups >= ``s``.
    A point slower than every point of the method is matched by the best of them (the
    unpruned base at 1x among them); NaN when ``s`` is beyond the method's fastest point."""
    pts = sorted(points)
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if len(xs) == 0 or s > xs[-1] + 1e-9:
        return float("nan")
    at = float(np.interp(max(s, xs[0]), xs, ys))
    faster = ys[xs >= s]
    return max(at, float(faster.max())) if len(faster) else at


def equal_latency(df, *, backend: str = "ort"):
    """For each dp method, seed and peer point: dp's top-1 at the peer's speedup minus the peer's."""
    import pandas as pd

    col = f"{backend}_speedup"
    out = []
    for seed, g in df.groupby("seed"):
        base = float(g["base_top1"].iloc[0])
        fronts = {m: [(1.0, base), *zip(gm[col], gm["top1"])] for m, gm in g.groupby("method")}
        for dp in [m for m in fronts if METHODS.get(m, Method("tp")).kind == "dp"]:
            for _, r in g[g["kind"] == "tp"].iterrows():
                acc = frontier_at(fronts[dp], float(r[col]))
                out.append({"seed": seed, "dp_method": dp, "peer": r["method"], "target": r["target"],
                            "peer_speedup": r[col], "peer_top1": r["top1"], "dp_top1_at_speedup": acc,
                            "delta": acc - r["top1"]})
    return pd.DataFrame(out)


def summary(df):
    """Mean, std, min over seeds per method and target."""
    agg = {"top1": ["mean", "std", "min"], "flops_reduction": ["mean"], "ort_speedup": ["mean", "min", "max"],
           "torch_speedup": ["mean"], "cpu_seconds": ["mean"], "seed": ["nunique"]}
    agg = {k: v for k, v in agg.items() if k in df.columns}
    s = df.groupby(["target", "method"]).agg(agg)
    s.columns = ["_".join(c) for c in s.columns]
    return s.reset_index()


def report(out: Path, page_dir: Path | None, command: str) -> Path:
    import pandas as pd

    rows = load_rows(out)
    if not rows:
        raise ValueError(f"{out}: no study rows (seed*/rows.jsonl) to report")
    df = pd.DataFrame(rows)
    df["flops_reduction"] = df["base_flops"] / df["flops"]
    dest = page_dir or out
    dest.mkdir(parents=True, exist_ok=True)
    cols = [c for c in ("seed", "target", "method", "base_top1", "top1", "flops_reduction", "ort_speedup",
                        "ort_low", "ort_high", "torch_speedup", "torch_low", "torch_high", "epochs",
                        "cpu_seconds", "round_to", "crucial", "widths") if c in df.columns]
    flat = df[cols].copy()
    for c in ("crucial", "widths"):
        if c in flat.columns:
            flat[c] = flat[c].map(lambda v: " ".join(map(str, v)))
    atomic_write_text(dest / "peers.csv", flat.to_csv(index=False, float_format="%.4f"))
    eq = equal_latency(df) if "ort_speedup" in df.columns else pd.DataFrame()
    if not eq.empty:
        atomic_write_text(dest / "peers_equal_latency.csv", eq.to_csv(index=False, float_format="%.4f"))
        _plot(df, dest / "peers.png")
    atomic_write_text(dest / "peers_summary.md", _tables(df, eq, command))
    return dest


def _tables(df, eq, command: str) -> str:
    s = summary(df)
    lines = [f"Command: `{command}`", "", "| target | method | seeds | top-1 mean | std | min | FLOPs red. |"
             " ORT speedup mean [min, max] | torch speedup | CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in s.iterrows():
        ort = (f"{r['ort_speedup_mean']:.2f}x [{r['ort_speedup_min']:.2f}, {r['ort_speedup_max']:.2f}]"
               if "ort_speedup_mean" in r else "-")
        tor = f"{r['torch_speedup_mean']:.2f}x" if "torch_speedup_mean" in r else "-"
        lines.append(f"| {r['target']:g}x | {r['method']} | {r['seed_nunique']} | {r['top1_mean']:.2f} | "
                     f"{r['top1_std']:.2f} | {r['top1_min']:.2f} | {r['flops_reduction_mean']:.2f}x | {ort} | {tor} | "
                     f"{r['cpu_seconds_mean']:.0f} |")
    if not eq.empty:
        lines += ["", "Equal latency (ORT CPU): dp top-1 at each peer point's measured speedup minus the peer's "
                  "top-1, per seed (NaN: the dp frontier does not reach that speedup).", "",
                  "| dp method | seeds | comparisons | mean delta | worst delta | wins >= 0.5 pt | wins >= 0 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for dp, g in eq.groupby("dp_method"):
            d = g["delta"]
            ok = d.notna()
            lines.append(f"| {dp} | {g['seed'].nunique()} | {int(ok.sum())}/{len(d)} | {d[ok].mean():+.2f} | "
                         f"{d[ok].min():+.2f} | {int((d[ok] >= 0.5).sum())} | {int((d[ok] >= 0).sum())} |")
        lines += ["", "Per seed: each delta, peer by peer (peer target, peer ORT speedup).", "",
                  "| dp method | seed | worst delta | mean delta | deltas |", "|---|---:|---:|---:|---|"]
        for (dp, seed), g in eq.groupby(["dp_method", "seed"]):
            d = g["delta"].dropna()
            each = ", ".join(f"{r.peer} {r.target:g}x @{r.peer_speedup:.2f}x: {r.delta:+.2f}"
                             for r in g.sort_values(["target", "peer"]).itertuples())
            lines.append(f"| {dp} | {seed} | {d.min():+.2f} | {d.mean():+.2f} | {each} |")
    return "\n".join(lines) + "\n"


COLORS = {"dp-ospr": "#1f77b4", "dp-stage": "#2ca02c", "dp-kd": "#9467bd", "dp-stage-kd": "#d62728",
          "dp-stage-kd-sgdft": "#e377c2", "dp-stage-kd-r8": "#17becf",
          "dp-stage-kd-stem": "#ff7f0e", "dp-stage-kd-nocost": "#bcbd22",
          "tp-l1": "#ff7f0e", "tp-bn": "#8c564b", "tp-taylor": "#7f7f7f"}
MARKERS = {"dp-ospr": "o", "dp-stage": "s", "dp-kd": "D", "dp-stage-kd": "*", "dp-stage-kd-sgdft": "X", "dp-stage-kd-r8": "h", "dp-stage-kd-stem": "P", "dp-stage-kd-nocost": "p", "tp-l1": "^", "tp-bn": "v",
           "tp-taylor": "P"}


def _plot(df, path: Path) -> None:
    from matplotlib.figure import Figure

    seeds = sorted(df["seed"].unique())
    fig = Figure(figsize=(4.2 * len(seeds), 4.0))
    axes = fig.subplots(1, len(seeds), squeeze=False)[0]
    for ax, seed in zip(axes, seeds):
        g = df[df["seed"] == seed]
        base = float(g["base_top1"].iloc[0])
        for m, gm in g.groupby("method"):
            gm = gm.sort_values("ort_speedup")
            xs = [1.0, *gm["ort_speedup"]]
            ys = [base, *gm["top1"]]
            ax.plot(xs, ys, marker=MARKERS.get(m, "x"), color=COLORS.get(m), label=m,
                    ms=9 if MARKERS.get(m) == "*" else 6, lw=1.4 if m.startswith("dp") else 1.0,
                    ls="-" if m.startswith("dp") else "--")
            ax.errorbar(gm["ort_speedup"], gm["top1"],
                        xerr=[gm["ort_speedup"] - gm["ort_low"], gm["ort_high"] - gm["ort_speedup"]],
                        fmt="none", ecolor=COLORS.get(m), lw=0.8)
        ax.set_title(f"base seed {seed} (top-1 {base:.2f}%)", fontsize=10)
        ax.set_xlabel("measured ORT CPU speedup (1 thread, batch 1)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="study folder (seed*/rows.jsonl; resumed when present)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0], help="FLOPs reductions")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--no-timing", action="store_true", help="skip speed measurement (tests)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the tables from --out")
    p.add_argument("--page", default=None, help="write peers.csv / peers_equal_latency.csv / peers.png here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set data.max_train_samples=10000)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench peers`` (entry point ``deploy_prune.bench_actions``)."""
    p = sub.add_parser("peers", help="deploy-prune against Torch-Pruning's recipes at equal epochs and "
                       "equal measured latency (docs/results/peers.md)", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=lambda args: _run(args, "deploy-prune bench peers " + " ".join(sys.argv[3:])))


def _run(args: argparse.Namespace, command: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    study = Study(config=args.config, overrides=list(args.overrides), seeds=args.seeds, targets=args.targets,
                  methods=args.methods, timing="none" if args.no_timing else "quick")
    try:
        if not args.report_only:
            for seed in study.seeds:
                run_seed(study, seed, out)
        dest = report(out, Path(args.page) if args.page else None, command)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dest}/peers.csv and peers_summary.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.studies.peers", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return _run(args, "python -m bench.studies.peers " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())

