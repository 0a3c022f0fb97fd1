"""OSPR's ablations as one table, on the same slim widths and training budget.

Studies (rows share the base model, the beta allocation's per-node widths and the budget):
- ``selection``: which channels fill those widths: beta, random, first-k, L1-norm (Fig. 5b);
- ``loss``: the mimic function: KL, JS, MSE, LASSO, and cross-entropy only ("Model_CE");
- ``nodes``: how many crucial nodes are mimicked, 1..N, with MSE (Fig. 2b; KL needs N >= 2);
- ``pipeline``: one-step recovery versus layer-by-layer (accuracy and wall time);
- ``scorer``: RBP scoring at the same FLOPs target (its own widths) versus beta, both + KL;
- ``recipe``: the recipe options of issue 18: crucial nodes by score (OSPR) or one per stage
  (``crucial.select``, its own widths), mimic alone or + task CE + logit KD (``recovery.ce_weight``,
  ``recovery.kd_weight``), as a 2x2 table.
Rows are appended to ``ablation.jsonl`` as they finish, so an interrupted ablation resumes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from deploy_prune import commands, distributed, pipeline
from deploy_prune.allocation import cut, keep_top
from deploy_prune.artifacts import atomic_write_text, load_model_dir, read_json_object
from deploy_prune.config import RunConfig, load_config
from deploy_prune.flops import count
from deploy_prune.nodes import discover
from deploy_prune.recovery.layerwise import layerwise
from deploy_prune.recovery.mimic import finetune, recover
from deploy_prune.run import Runner, preflight, prepare_out
from deploy_prune.scoring import SCORERS

log = logging.getLogger(__name__)
STUDIES = ("selection", "loss", "nodes", "pipeline", "scorer", "recipe")


@dataclasses.dataclass(frozen=True)
class Variant:
    study: str
    name: str
    selection: str = "beta"  # scorer choosing the channels (widths from beta)
    loss: str = "kl"
    mode: str = "onestep"  # onestep | ce | layerwise
    nodes: int | None = None  # mimic the last k crucial nodes (None: all)
    scorer: str = "beta"  # scorer deciding the widths too (RBP row)
    select: str | None = None  # crucial.select (None: the config's); another rule -> its own widths
    kd: bool | None = None  # recovery with CE + logit KD at weight 1 each (None: the config's weights)


def variants(n_crucial: int, studies: tuple[str, ...]) -> list[Variant]:
    out: list[Variant] = []
    if "selection" in studies:
        out += [Variant("selection", s, selection=s) for s in ("beta", "random", "first_k", "l1")]
    if "loss" in studies:
        out += [Variant("loss", x, loss=x) for x in ("kl", "js", "mse", "lasso")]
        out.append(Variant("loss", "ce", mode="ce"))
    if "nodes" in studies:
        out += [Variant("nodes", f"mse_last_{k}", loss="mse", nodes=k) for k in range(1, n_crucial + 1)]
    if "pipeline" in studies:
        out += [Variant("pipeline", "one_step"), Variant("pipeline", "layerwise", mode="layerwise")]
    if "scorer" in studies:
        out += [Variant("scorer", s, scorer=s, selection=s) for s in ("beta", "rbp") if s in SCORERS]
    if "recipe" in studies:
        out += [Variant("recipe", f"{sel}{'+ce_kd' if kd else ''}", select=sel, kd=kd)
                for sel in ("score", "per_stage") for kd in (False, True)]
    return out


class Ablation:
    def __init__(self, cfg: RunConfig, out: Path, *, from_run: str | None = None, data=None) -> None:
        self.cfg, self.out = cfg, out
        self.runner = Runner(cfg, out, base_dir=str(Path(from_run) / "base") if from_run else None, data=data)
        self.from_run = Path(from_run) if from_run else None
        self.rows_path = out / "ablation.jsonl"
        self.done = {(r["study"], r["variant"]): r for r in self._read_rows()}
        self.scores: dict[str, Any] = {}
        self.decisions: dict[str, Any] = {}  # widths a scorer decided itself (RBP)
        self.score_seconds: dict[str, float] = {}

    def _read_rows(self) -> list[dict]:
        if not self.rows_path.is_file():
            return []
        return [json.loads(line) for line in self.rows_path.read_text().splitlines() if line.strip()]

    def scores_for(self, name: str, model, plan, *, crucial: list[str] | None = None):
        """Scores by the named scorer (cached); a width-deciding scorer gets beta's crucial set.

        With ``--from RUN_DIR`` the run's own beta scores are reused, so the ablation studies
        exactly the widths and crucial nodes of that run.
        """
        reuse = self.from_run / "scores.json" if self.from_run else None
        if name == self.cfg.scoring.method and name not in self.scores and reuse and reuse.is_file():
            data = read_json_object(reuse)  # parsed once: the scores and the time they took
            self.scores[name], self.decisions[name] = pipeline.scored(data, plan, source=reuse, model=model)
            self.score_seconds[name] = float(data.get("seconds", 0.0))
        if name not in self.scores:
            cfg = dataclasses.replace(self.cfg, scoring=dataclasses.replace(self.cfg.scoring, method=name))
            if crucial:
                cfg = dataclasses.replace(cfg, crucial=dataclasses.replace(cfg.crucial, nodes=list(crucial)))
            res = pipeline.score(model, plan, cfg, self.runner.data, self.runner.device)
            self.scores[name], self.decisions[name] = pipeline.scored(res, plan, source=name)
            self.score_seconds[name] = res["seconds"]
        return self.scores[name]

    def row(self, v: Variant, model, plan, ref) -> dict[str, Any]:
        """Prune (same widths unless the scorer decides them), recover, fine-tune, evaluate."""
        example = plan.example()
        loader = self._fresh_loader()
        if v.select is not None and v.select != self.cfg.crucial.select:
            cfg = dataclasses.replace(self.cfg, crucial=dataclasses.replace(self.cfg.crucial, select=v.select))
            res = pipeline.prune(model, plan, cfg, self.scores_for("beta", model, plan))
            slim, kept, crucial = res.slim, res.plan.kept or {}, res.plan.info["crucial_nodes"]
        elif v.scorer != "beta":  # the scorer decides widths too, with beta's crucial nodes (fair)
            crucial = ref.plan.info["crucial_nodes"]
            scores = self.scores_for(v.scorer, model, plan, crucial=crucial)
            res = pipeline.prune(model, plan, self.cfg, scores, crucial=crucial,
                                 decision=self.decisions.get(v.scorer))
            slim, kept, crucial = res.slim, res.plan.kept or {}, res.plan.info["crucial_nodes"]
        else:
            kept = keep_top(self.scores_for(v.selection, model, plan), ref.allocation.counts)
            slim, crucial = cut(model, kept, example), ref.plan.info["crucial_nodes"]
        base_flops = ref.allocation.base_flops
        flops = count(slim, example).flops
        pruned = self.runner.evaluate(slim)
        names = crucial if v.nodes is None else crucial[-v.nodes:]
        rc = dataclasses.replace(self.cfg.recovery, loss=v.loss, mode=v.mode)
        if v.kd is not None:
            rc = dataclasses.replace(rc, ce_weight=float(v.kd), kd_weight=float(v.kd))
        t0, c0 = time.perf_counter(), time.process_time()  # wall, and CPU (load-independent)
        nodes = discover(model, example)
        if v.mode == "layerwise":
            slim, extra = layerwise(model, nodes, kept, loader=loader, cfg=rc,
                                    device=self.runner.device, example=example)
            epochs = extra["epochs"]
        else:
            recover(model, slim, teacher_nodes=nodes, student_nodes=discover(slim, example), names=names,
                    loader=loader, cfg=rc, device=self.runner.device)
            epochs = rc.epochs
        t_rec, c_rec = time.perf_counter() - t0, time.process_time() - c0
        recovered = self.runner.evaluate(slim)
        t1, c1 = time.perf_counter(), time.process_time()
        finetune(slim, loader=loader, cfg=self.cfg.finetune, device=self.runner.device)
        t_ft, c_ft = time.perf_counter() - t1, time.process_time() - c1
        final = self.runner.evaluate(slim)
        model.cpu()
        return {"study": v.study, "variant": v.name, "scorer": v.scorer, "selection": v.selection,
                "crucial_nodes": " ".join(crucial), "ce_weight": rc.ce_weight, "kd_weight": rc.kd_weight,
                "loss": v.loss if v.mode == "onestep" else v.mode, "mode": v.mode, "mimic_nodes": len(names),
                "flops_reduction": base_flops / flops, "pruned_top1": pruned["top1"],
                "recovered_top1": recovered["top1"], "finetuned_top1": final["top1"],
                "score_seconds": self.score_seconds.get(v.scorer if v.scorer != "beta" else v.selection, 0.0),
                "recovery_seconds": t_rec, "recovery_epochs": epochs, "finetune_seconds": t_ft,
                "seconds": t_rec + t_ft, "recovery_cpu_seconds": c_rec, "cpu_seconds": c_rec + c_ft}

    def _fresh_loader(self):
        """The training loader from its first shuffle, so every row sees the same batches."""
        loader = self.runner.data.train
        return loader.with_options() if hasattr(loader, "with_options") else loader

    def run(self, studies: tuple[str, ...]) -> list[dict]:
        self.runner.timed("base", self.runner.stage_base)
        model, plan = load_model_dir(self.out / "base")
        ref = pipeline.prune(model, plan, self.cfg, self.scores_for("beta", model, plan))
        todo = variants(len(ref.plan.info["crucial_nodes"]), studies)
        log.info("ablation: %d rows (%d already done)", len(todo), sum((v.study, v.name) in self.done for v in todo))
        n_crucial = len(ref.plan.info["crucial_nodes"])
        same: dict[tuple, dict] = {}  # one experiment under several labels is run once
        rows = []
        for i, v in enumerate(todo):
            rc = self.cfg.recovery
            kd = (rc.ce_weight, rc.kd_weight) if v.kd is None else (float(v.kd), float(v.kd))
            key = (v.scorer, v.selection, v.loss, v.mode, v.nodes or n_crucial, v.select or self.cfg.crucial.select, kd)
            if (v.study, v.name) not in self.done:
                if key in same:
                    r = {**same[key], "study": v.study, "variant": v.name}
                else:
                    log.info("ablation row %d/%d: %s / %s", i + 1, len(todo), v.study, v.name)
                    r = self.row(v, copy.deepcopy(model), plan, ref)
                with self.rows_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                self.done[(v.study, v.name)] = r
            same.setdefault(key, self.done[(v.study, v.name)])
            rows.append(self.done[(v.study, v.name)])
        write_tables(rows, self.out, base_top1=self.runner.state.get("base")["top1"], widths=ref.plan.info["widths"])
        return rows


def write_tables(rows: list[dict], out: Path, *, base_top1: float, widths: dict[str, int]) -> None:
    """ablation.csv / .json / .md and ablation.png, all from the same table."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df["drop_vs_base"] = base_top1 - df["finetuned_top1"]
    atomic_write_text(out / "ablation.csv", df.to_csv(index=False))
    atomic_write_text(out / "ablation.json", df.to_json(orient="records", indent=1))
    cols = ["study", "variant", "flops_reduction", "pruned_top1", "recovered_top1", "finetuned_top1",
            "drop_vs_base", "recovery_epochs", "recovery_seconds", "seconds", "recovery_cpu_seconds"]
    cols = [c for c in cols if c in df.columns]
    md = [f"# Ablations (baseline top-1 {base_top1:.2f}%)", "",
          "Same base model, same per-node widths (except the RBP row, whose scorer decides them), "
          "same recovery and fine-tuning budget.", "", f"Widths: {widths}", "",
          df[cols].to_markdown(index=False, floatfmt=".2f") if _has_tabulate() else df[cols].to_string(index=False)]
    atomic_write_text(out / "ablation.md", "\n".join(md) + "\n")
    _plot(df, out / "ablation.png", base_top1)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(df, path: Path, base_top1: float) -> None:
    """Top-1 after recovery and after fine-tuning per row; labels slanted so they never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(df)), 4.8))
    labels = [f"{s}: {v}" for s, v in zip(df["study"], df["variant"])]
    x = range(len(df))
    ax.bar([i - 0.2 for i in x], df["recovered_top1"], width=0.4, label="after recovery")
    ax.bar([i + 0.2 for i in x], df["finetuned_top1"], width=0.4, label="after fine-tuning")
    ax.axhline(base_top1, color="k", ls="--", lw=1, label=f"baseline {base_top1:.2f}%")
    lo = max(0.0, min(df["recovered_top1"].min(), base_top1) - 5)
    ax.set_ylim(lo, min(100.0, base_top1 + 3))
    ax.set_xticks(list(x), labels, fontsize=7, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def ablate(cfg: RunConfig, out: str | Path, *, studies: tuple[str, ...] = STUDIES, from_run: str | None = None,
           resume: bool = False, force: bool = False) -> list[dict]:
    out = Path(out)
    data = preflight(cfg, base_dir=str(Path(from_run) / "base") if from_run else None)
    lock = prepare_out(out, resume=resume, force=force)
    try:
        return Ablation(cfg, out, from_run=from_run, data=data).run(studies)
    finally:
        lock.release()


def cmd_ablate(args) -> int:
    studies = tuple(args.only.split(",")) if args.only else STUDIES
    bad = [s for s in studies if s not in STUDIES]
    if bad:
        raise ValueError(f"--only: unknown studies {bad}; choose from {', '.join(STUDIES)}")
    if distributed.active():
        raise ValueError("ablate runs in one process: its studies all write one folder, so launch it "
                         "without torchrun (deploy-prune ablate ...); run supports torchrun")
    cfg = load_config(args.config_file, commands.overrides(args))
    rows = ablate(cfg, args.out, studies=studies, from_run=args.from_run, resume=args.resume, force=args.force)
    print(f"{len(rows)} ablation rows -> {args.out}/ablation.md, ablation.csv, ablation.png")
    for r in rows:
        print(f"  {r['study']:<10} {r['variant']:<12} pruned {r['pruned_top1']:6.2f}  recovered "
              f"{r['recovered_top1']:6.2f}  fine-tuned {r['finetuned_top1']:6.2f}  {r['seconds']:7.1f}s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ablate`` to the ``deploy-prune`` command line (entry point ``deploy_prune.commands``)."""
    p = sub.add_parser("ablate", help="the paper's ablations as one table (CSV, Markdown, plot)",
                       description="Filter selection (beta/random/first-k/L1), mimic function "
                       "(KL/JS/MSE/LASSO/CE), number of mimicked nodes (MSE), one-step vs "
                       "layer-by-layer, and RBP vs beta, on the same widths and budget.")
    commands.job_args(p)
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR", help="reuse RUN_DIR/base instead of training")
    p.add_argument("--only", metavar="STUDIES", help="comma-separated subset of: selection,loss,nodes,pipeline,scorer,recipe")
    p.set_defaults(func=cmd_ablate)
