"""The end-to-end job: baseline -> score -> crucial nodes -> allocate -> surgery -> recover ->
fine-tune -> evaluate, with a checkpoint after every stage (and inside the long ones) so an
interrupted run resumes without redoing finished work.

Layout of a run directory::

    base/  scores.json  pruned/  recovered/  slim/  ckpt/  state.json  report.json  report.md
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune import distributed, pipeline, speed
from deploy_prune.artifacts import (
    ModelPlan,
    OutputLock,
    atomic_write_text,
    check_model_size,
    finite_json,
    load_model_dir,
    open_job_dir,
    read_json_object,
    read_plan,
    save_model_dir,
    versions,
)
from deploy_prune.checkpoint import Checkpointer
from deploy_prune.config import RunConfig, to_dict
from deploy_prune.data import DataBundle, load_data, stage_loader
from deploy_prune.nodes import discover
from deploy_prune.recovery.layerwise import layerwise
from deploy_prune.recovery.mimic import finetune, finetune_state, recover, recovery_state
from deploy_prune.train import StepState, evaluate

log = logging.getLogger(__name__)
STAGES = ("base", "score", "prune", "recover", "finetune")


class RunState:
    """``state.json``: finished stages, their seconds and metrics."""

    def __init__(self, out: Path) -> None:
        self.path = out / "state.json"
        self.data: dict[str, Any] = read_json_object(self.path) if self.path.is_file() else {"stages": {}}
        if not isinstance(self.data.get("stages"), dict):
            raise ValueError(f"{self.path}: corrupt run state (no 'stages' mapping); --force to start over")

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, seconds: float, **metrics: Any) -> None:
        self.data["stages"][stage] = {"seconds": seconds, **metrics}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def get(self, stage: str) -> dict[str, Any]:
        return self.data["stages"][stage]


def checkpoint_seconds(path: Path) -> float:
    """Seconds an interrupted stage had spent up to its last checkpoint (0 when none)."""
    if not path.is_file():
        return 0.0
    try:
        return float(torch.load(path, map_location="cpu", weights_only=True)["seconds"])
    except Exception:  # unreadable: the stage restarts from step 0 and counts from there
        return 0.0


def prepare_out(out: Path, *, resume: bool, force: bool) -> OutputLock:
    """Create, reuse (--resume) or empty (--force, only a directory deploy-prune made) the job
    directory and lock it against a second process; the caller releases the returned lock."""
    return open_job_dir(out, resume=resume, force=force)


def preflight(cfg: RunConfig, *, base_dir: str | None = None) -> DataBundle:
    """Everything that can be checked before the output is touched: the device, the --base
    directory and the data (loaded here, so a missing data root fails before --force deletes)."""
    pipeline.setup(cfg)
    if base_dir:
        read_plan(base_dir)
    data = load_data(cfg.data, seed=cfg.seed)
    if not base_dir:  # the model the base training will build, on the meta device
        check_model_size(cfg.model.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                         source="model.kwargs", **cfg.model.kwargs)
        if cfg.model.weights and not Path(cfg.model.weights).is_file():
            raise FileNotFoundError(f"model.weights: file not found: {cfg.model.weights}")
    return data


class Runner:
    """Holds what the stages share; each stage method is idempotent given ``state.json``."""

    def __init__(self, cfg: RunConfig, out: Path, *, base_dir: str | None = None,
                 data: DataBundle | None = None, display_out: str | Path | None = None) -> None:
        self.cfg, self.out, self.base_dir = cfg, out, base_dir
        self.display_out = display_out if display_out is not None else out  # as the user typed it
        self.device = pipeline.setup(cfg)
        self.state = RunState(out)
        self._data: DataBundle | None = data

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            self._data = load_data(self.cfg.data, seed=self.cfg.seed)
        return self._data

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = evaluate(model.to(self.device), self.data.test, self.device)
        model.cpu()
        return metrics

    def timed(self, stage: str, fn) -> None:
        """Run a stage unless done; its seconds add up over the segments of a resumed run."""
        if self.state.done(stage):
            log.info("stage %s: done, skipped", stage)
            return
        self.t0 = time.perf_counter()
        prior = checkpoint_seconds(self.ckpt(stage))
        metrics = fn() or {}
        seconds = prior + time.perf_counter() - self.t0
        self.state.finish(stage, seconds, **metrics)
        log.info("stage %s: %.1fs %s", stage, seconds, metrics)

    def ckpt(self, stage: str) -> Path:
        return self.out / "ckpt" / f"{stage}.pt"

    def checkpointer(self, stage: str, model: nn.Module, state: StepState) -> Checkpointer:
        """A mid-stage checkpointer for ``stage``, restored from disk when one is there."""
        ck = Checkpointer(self.ckpt(stage), {"model": model}, state, started=self.t0)
        ck.restore()
        return ck

    # -- stages --------------------------------------------------------------------------------
    def stage_base(self) -> dict:
        if self.base_dir:
            model, plan = load_model_dir(self.base_dir)
            plan.info.setdefault("config", to_dict(self.cfg))
            metrics = self.evaluate(model)
        else:
            model, plan, metrics = pipeline.train_base(self.cfg, self.data, self.device,
                                                       checkpoint=self.ckpt("base"), started=self.t0)
        save_model_dir(model, plan, self.out / "base", force=True)
        return {"top1": metrics["top1"], "top5": metrics["top5"]}

    def stage_score(self) -> dict:
        model, plan = load_model_dir(self.out / "base")
        result = pipeline.score(model, plan, self.cfg, self.data, self.device, checkpoint=self.ckpt("score"),
                                started=self.t0)
        atomic_write_text(self.out / "scores.json", finite_json(result, what=str(self.out / "scores.json")))
        return {"scorer": result["scorer"]}

    def stage_prune(self) -> dict:
        """Allocate, cut and evaluate. A ``speed`` entry in the returned metrics (a quick measured
        speedup of the cut model, see :func:`speed_line`) reaches report.json and the summary."""
        model, plan = load_model_dir(self.out / "base")
        scores, decision = pipeline.read_scored(self.out / "scores.json", plan, model)
        res = pipeline.prune(model, plan, self.cfg, scores, decision=decision)
        save_model_dir(res.slim, res.plan, self.out / "pruned", force=True)
        m = self.evaluate(res.slim)
        return {"top1": m["top1"], "top5": m["top5"], "flops_reduction": res.allocation.flops_reduction}

    def stage_recover(self) -> dict:
        teacher, base_plan = load_model_dir(self.out / "base")
        student, plan = load_model_dir(self.out / "pruned")
        pipeline.seed_stage(self.cfg.seed, "recover")
        loader = self._loader("recover", self.cfg.recovery.batch_size, base_plan)
        student, info = recover_slim(teacher, student, plan, self.cfg, loader, self.device,
                                     ckpt=self.ckpt("recover"), started=self.t0)
        save_model_dir(student, plan, self.out / "recovered", force=True)
        m = self.evaluate(student)
        return {"top1": m["top1"], "top5": m["top5"], **info}

    def stage_finetune(self) -> dict:
        student, plan = load_model_dir(self.out / "recovered")
        fc = self.cfg.finetune
        pipeline.seed_stage(self.cfg.seed, "finetune")
        loader = self._loader("finetune", None, load_model_dir(self.out / "base")[1])
        if fc.epochs > 0:
            state = finetune_state(student.to(self.device), loader, fc)
            ck = self.checkpointer("finetune", student, state)
            finetune(student, loader=loader, cfg=fc, device=self.device, state=state, on_step=ck.save)
        student.cpu().eval()
        save_model_dir(student, plan, self.out / "slim", force=True)
        m = self.evaluate(student)
        return {"top1": m["top1"], "top5": m["top5"], "epochs": fc.epochs}

    def speed_check(self) -> dict[str, Any] | None:
        """The slowdown guard on base vs slim (deploy_prune.speed); None when switched off."""
        base, base_plan = load_model_dir(self.out / "base")
        slim, slim_plan = load_model_dir(self.out / "slim")
        return speed.speed_check(base, base_plan, slim, slim_plan, self.cfg)

    def _loader(self, stage: str, batch_size: int | None, base_plan):
        """The training stream from where ``stage`` starts on it (a function of the config)."""
        first = pipeline.first_epochs(self.cfg, self.data.train, trained=pipeline.trained_here(base_plan))
        return stage_loader(self.data.train, batch_size=batch_size, first_epoch=first[stage])

    def run(self) -> dict[str, Any]:
        for stage in STAGES:
            self.timed(stage, getattr(self, f"stage_{stage}"))
        shutil.rmtree(self.out / "ckpt", ignore_errors=True)
        report = build_report(self.out, self.state, self.cfg, self.device)
        check = self.speed_check() if distributed.is_main() else None
        if check is not None:
            report["speed_check"] = check
        atomic_write_text(self.out / "report.json", json.dumps(report, indent=1))
        atomic_write_text(self.out / "report.md", render_report(report, self.display_out))
        return report


def recover_slim(teacher: nn.Module, student: nn.Module, plan: ModelPlan, cfg: RunConfig, loader,
                 device: torch.device, *, ckpt: Path | None = None,
                 started: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Recover ``student`` (cut from ``teacher`` by ``plan``) per ``cfg.recovery``; returns it (eval,
    CPU) and what was done. ``ckpt``: a mid-stage checkpoint file to resume from and write."""
    rc, example = cfg.recovery, plan.example()
    info: dict[str, Any] = {"mode": rc.mode, "loss": rc.loss if rc.mode == "onestep" else rc.mode}
    if rc.mode == "layerwise":
        nodes = discover(teacher, example)
        student, extra = layerwise(teacher, nodes, plan.kept or {}, loader=loader, cfg=rc,
                                   device=device, example=example)
        info.update(extra)
    elif rc.mode in ("onestep", "ce"):
        names = rc.nodes or plan.info.get("crucial_nodes")
        if not names:
            raise ValueError("no nodes to mimic: the slim plan names no crucial_nodes; set recovery.nodes")
        state = recovery_state(student, loader, rc, teacher)
        on_step = None
        if ckpt is not None:
            ck = Checkpointer(ckpt, {"model": student}, state, started=started)
            ck.restore()
            on_step = ck.save
        recover(teacher, student, teacher_nodes=discover(teacher, example),
                student_nodes=discover(student, example), names=names, loader=loader, cfg=rc,
                device=device, state=state, on_step=on_step)
        info.update(nodes=names, epochs=rc.epochs, steps=state.steps)
    elif rc.mode != "none":
        raise ValueError(f"recovery.mode: expected onestep, layerwise, ce or none, got {rc.mode!r}")
    return student.cpu().eval(), info


def build_report(out: Path, state: RunState, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """report.json: the named fields of issue 3 plus provenance."""
    base = json.loads((out / "base" / "plan.json").read_text())
    slim = json.loads((out / "slim" / "plan.json").read_text())
    s = state.data["stages"]
    widths = {k: {"base": slim["base_widths"][k], "slim": slim["widths"][k]} for k in slim["widths"]}
    return {
        "base": {"top1": s["base"]["top1"], "top5": s["base"]["top5"], "flops": slim["base_flops"],
                 "params": slim["base_params"], "arch": base["arch"]},
        "pruned": {"top1": s["prune"]["top1"], "top5": s["prune"]["top5"]},
        "recovered": {"top1": s["recover"]["top1"], "top5": s["recover"]["top5"]},
        "slim": {"top1": s["finetune"]["top1"], "top5": s["finetune"]["top5"], "flops": slim["flops"],
                 "params": slim["params"]},
        "flops_reduction": slim["flops_reduction"],
        "params_reduction": slim["base_params"] / max(slim["params"], 1),
        "crucial_nodes": slim["crucial_nodes"],
        **latency_fields(slim),
        # the quick measured speedup, when the prune stage measured one (see speed_line)
        **({"speed": s["prune"]["speed"]} if s["prune"].get("speed") else {}),
        "widths": widths,
        "recovery": {k: v for k, v in s["recover"].items() if k not in ("top1", "top5", "seconds")},
        "seconds": {k: round(v["seconds"], 2) for k, v in s.items()},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "config": to_dict(cfg),
        "versions": versions(),
    }


def latency_fields(slim_plan: dict[str, Any]) -> dict[str, Any]:
    """``latency`` (base, predicted, measured ms and measured speedup) for speedup/latency targets."""
    lat = slim_plan.get("latency")
    if not lat:
        return {}
    keys = ("base_ms", "predicted_ms", "measured_ms", "measured_speedup", "requested_ms", "backend",
            "device", "device_name", "precision", "batch", "threads", "clock")
    return {"latency": {k: lat[k] for k in keys if k in lat}}


def speed_line(r: dict[str, Any]) -> str | None:
    """One line on the measured speedup, when the run has one.

    ``report["speed"]`` is the hook for the quick measurement made after pruning (the slowdown
    guard): ``{"speedup": float, "ci": [lo, hi] (optional), "backend": str, "device": str,
    "batch": int, "precision": str}``. A latency-targeted run also has ``latency.measured_speedup``.
    """
    if r.get("speed_check"):  # the slowdown guard (deploy_prune.speed), measured at the end of run
        return speed.summary_line(r["speed_check"])
    sp = r.get("speed")
    if sp and sp.get("speedup") is not None:
        ci = f" [{sp['ci'][0]:.2f}, {sp['ci'][1]:.2f}]" if sp.get("ci") else ""
        where = ", ".join(str(sp[k]) for k in ("backend", "device", "precision") if sp.get(k))
        batch = f", batch {sp['batch']}" if sp.get("batch") else ""
        return f"measured speedup {sp['speedup']:.2f}x{ci} ({where}{batch})"
    lat = r.get("latency", {})
    if lat.get("measured_speedup") is not None:
        return (f"measured speedup {lat['measured_speedup']:.2f}x ({lat.get('backend', '?')}, "
                f"{lat.get('device', '?')}, batch {lat.get('batch', '?')})")
    return None


def next_commands(out: str | Path) -> list[str]:
    """What a user runs after ``run``: export the slim model and measure it against its base."""
    return [f"deploy-prune export {out}/slim --format onnx --out {out}/slim.onnx",
            f"deploy-prune bench --base {out}/base --slim {out}/slim --backends torch ort --device cpu "
            f"--precision fp32 --batch 1 8 --threads 1 --clock cpu --out {out}/bench"]


def width_rows(r: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(node, base, slim, note) per node of the report's width table."""
    crucial = set(r.get("crucial_nodes") or [])
    return [(k, w["base"], w["slim"], "crucial" if k in crucial else "") for k, w in r["widths"].items()]


def summary_text(r: dict[str, Any], out: str | Path) -> str:
    """What ``run`` prints at the end: widths, accuracies, speed (if measured) and next commands."""
    lines = [f"{'node':<32} {'base':>6} {'slim':>6} {'kept':>7}  note", "-" * 62]
    for name, b, sl, note in width_rows(r):
        lines.append(f"{name:<32} {b:>6} {sl:>6} {100 * sl / b:>6.1f}%  {note}".rstrip())
    lines += [f"{r['base']['arch']}: {r['flops_reduction']:.2f}x fewer FLOPs; top-1 base "
              f"{r['base']['top1']:.2f}% | pruned {r['pruned']['top1']:.2f}% | recovered "
              f"{r['recovered']['top1']:.2f}% | slim {r['slim']['top1']:.2f}%"]
    speed = speed_line(r)
    lines += [speed] if speed else []
    lines += ["stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()),
              f"report: {out}/report.md, slim model: {out}/slim", "next:"]
    lines += [f"  {c}" for c in next_commands(out)]
    return "\n".join(lines)


def render_report(r: dict[str, Any], out: str | Path | None = None) -> str:
    """A readable report.md from report.json (``out``: the run directory, for the next commands)."""
    lines = [f"# deploy-prune run: {r['base']['arch']}", "",
             f"FLOPs {r['base']['flops'] / 1e6:.2f}M -> {r['slim']['flops'] / 1e6:.2f}M "
             f"(**{r['flops_reduction']:.2f}x fewer**), params {r['base']['params'] / 1e6:.3f}M -> "
             f"{r['slim']['params'] / 1e6:.3f}M; device {r['device']}, {r['threads']} threads.", ""]
    speed = speed_line(r)
    lines += [speed[0].upper() + speed[1:] + ".", ""] if speed else []
    lines += ["| stage | top-1 (%) | top-5 (%) | seconds |", "|---|---:|---:|---:|"]
    sec = r["seconds"]
    for label, key, stage in [("baseline", "base", "base"), ("pruned, no recovery", "pruned", "prune"),
                              ("after mimic recovery", "recovered", "recover"),
                              ("after fine-tuning (slim)", "slim", "finetune")]:
        lines.append(f"| {label} | {r[key]['top1']:.2f} | {r[key]['top5']:.2f} | {sec.get(stage, 0):.1f} |")
    if r.get("speed_check"):
        if r["speed_check"].get("cause"):
            lines += ["", f"**Warning: the slim model is not faster than its base.** Likely cause: "
                      f"{r['speed_check']['cause']}."]
    lines += ["", f"Crucial nodes (never narrowed, mimicked): {', '.join(r['crucial_nodes'])}", "",
              "| node | base | slim | kept | note |", "|---|---:|---:|---:|---|"]
    for name, b, sl, note in width_rows(r):
        lines.append(f"| {name} | {b} | {sl} | {100 * sl / b:.0f}% | {note} |")
    if out is not None:
        lines += ["", "Next: export the slim model and measure it against its base:", "", "```bash",
                  *next_commands(out), "```"]
    return "\n".join(lines) + "\n"


def check_resume_config(out: Path, cfg: RunConfig) -> None:
    """A resumed run must use the config it started with; the first run records it."""
    path = out / "config.json"
    now = to_dict(cfg)
    if path.is_file():
        then = read_json_object(path)
        diff = sorted(_diff_keys(then, now))
        if diff:
            raise ValueError(f"{out} was started with a different config (keys differ: {', '.join(diff[:6])}); "
                             "resume with the same config and overrides, or --force to start over")
    else:
        atomic_write_text(path, json.dumps(now, indent=1))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, force: bool = False,
        base_dir: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job into ``out``; returns report.json's content."""
    out = Path(out)
    data = preflight(cfg, base_dir=base_dir)  # nothing under --out is touched before this passes
    lock = None
    try:
        if distributed.is_main():
            lock = prepare_out(out, resume=resume, force=force)
            check_resume_config(out, cfg)
        distributed.barrier()
        # under torchrun every rank computes the same models; rank 0 owns DIR, the others a scratch
        # folder inside it (kept until the run finishes, so a resumed run finds it)
        work = out if distributed.is_main() else out / f".rank{distributed.rank()}"
        work.mkdir(parents=True, exist_ok=True)
        report = Runner(cfg, work, base_dir=base_dir, data=data, display_out=out).run()
        distributed.barrier()
        if distributed.is_main():
            for scratch in out.glob(".rank*"):
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()
    return report


