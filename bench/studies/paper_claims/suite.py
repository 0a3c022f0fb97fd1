"""``deploy-prune bench suite CONFIG --out DIR``: the papers' operating points, measured.

Builds the ImageNet-shape base and slim models of every operating point and width rounding
(:mod:`bench.studies.paper_claims.models`) and times each slim model against its base with the bench sweep
(:mod:`bench.sweep`), one *unit* (stage x rounding x point) at a time. Units run stage by stage
in config order, so the headline measurements come first and a ``budget_minutes`` cut falls on
the later ones (their rows say ``skipped: cut for time``). A separate process builds the model
directories ahead of the measurements. Every finished unit is cached as CSV under
``DIR/units/``; a rerun resumes, and tries again the units that timed nothing (a GPU stage
resumed on a GPU machine is measured there). The combined table, page and plot are written by
:mod:`bench.studies.paper_claims.report`.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shlex
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from bench import env, table
from bench.backends import BACKENDS, Artifact
from bench.studies.paper_claims.config import PointConfig, StageConfig, SuiteConfig, load_suite
from bench.studies.paper_claims.models import (
    ONNX_FILE,
    build_slim,
    ensure_base,
    ensure_onnx,
    slim_dir,
    width_source,
)
from bench.sweep import BenchConfig, Shared, load_artifact, make_shared, pinned_threads, sweep
from deploy_prune.allocation import AllocationError
from deploy_prune.artifacts import atomic_write_text
from deploy_prune.progress import progress

log = logging.getLogger(__name__)
CUT_FOR_TIME = "cut for time: the suite's budget_minutes was spent before this unit"


@dataclass(frozen=True)
class Unit:
    """One measurement: a stage of backends and batches, on one point at one rounding, in one
    of the suite's ``repeats`` passes."""

    stage: StageConfig
    point: PointConfig
    rounding: int
    repeat: int = 0

    @property
    def key(self) -> str:
        return f"{self.stage.name}-{self.point.name}-r{self.rounding}" + (f"-rep{self.repeat}" if self.repeat else "")


def plan_units(cfg: SuiteConfig) -> list[Unit]:
    """Pass by pass (``repeats``), then stage by stage (config order), rounding, operating point:
    the repeats of one unit are a whole pass apart, and a budget cut falls on the last pass."""
    return [Unit(s, p, r, k) for k in range(cfg.repeats) for s in cfg.stages for r in s.roundings
            for p in cfg.points]


def stage_config(cfg: SuiteConfig, stage: StageConfig, point: PointConfig) -> BenchConfig:
    """The bench sweep config of one stage; CUDA stages use the wall clock (CPU time is no latency there)."""
    timing = stage.timing or cfg.timing
    if "cuda" in stage.devices and timing.clock == "cpu":
        timing = replace(timing, clock="wall")
    return BenchConfig(backends=tuple(stage.backends), devices=tuple(stage.devices),
                       precisions=tuple(stage.precisions), batches=tuple(stage.batches),
                       threads=cfg.threads, channels_last=stage.channels_last,
                       compile_mode=stage.compile_mode, timing=timing, seed=cfg.seed, model_name=point.arch)


def unit_columns(unit: Unit, cfg: SuiteConfig) -> dict[str, Any]:
    """What the suite adds to each bench row."""
    return {"rounding": unit.rounding, "operating_point": unit.point.name, "source": unit.point.source,
            "target_flops_reduction": unit.point.flops_reduction, "width_source": width_source(cfg),
            "stage": unit.stage.name, "channels_last": unit.stage.channels_last, "repeat": unit.repeat}


def skip_rows(unit: Unit, cfg: SuiteConfig, precisions: list[str], reason: str,
              status: str = "skipped") -> list[dict[str, Any]]:
    """``skipped`` (or ``error``) rows, no model timed, for the unit's combinations at ``precisions``."""
    s = unit.stage
    return [{"model": unit.point.arch, "variant": v, "backend": b, "device": d, "precision": p, "batch": n,
             "threads": cfg.threads, "status": status, "error": reason, **unit_columns(unit, cfg)}
            for b in s.backends for d in s.devices for p in precisions for n in s.batches
            for v in ("base", "slim")]


def unavailable_reasons(bcfg: BenchConfig) -> dict[str, str] | None:
    """precision -> why the stage cannot run here, when none of its combinations can (a GPU stage on
    a CPU box); None when something can run."""
    reasons: dict[str, str] = {}
    for b in bcfg.backends:
        for d in bcfg.devices:
            for p in bcfg.precisions:
                reason = BACKENDS.get(b).unavailable(d, p, bcfg.options())
                if not reason:
                    return None
                reasons.setdefault(p, reason)
    return reasons


def planned_flops(root: Path, unit: Unit, cfg: SuiteConfig) -> dict[str, dict[str, Any]]:
    """variant -> FLOPs columns, from a built slim plan (no model is loaded for rows that time nothing)."""
    from deploy_prune.artifacts import read_plan

    path = slim_dir(root, unit.point, unit.rounding, width_source(cfg))
    if not (path / "plan.json").is_file():
        return {}
    info = read_plan(path).info
    return {"slim": {"flops_reduction": info.get("flops_reduction"), "flops": info.get("flops")},
            "base": {"flops_reduction": 1.0, "flops": info.get("base_flops")}}


def unavailable_rows(root: Path, unit: Unit, cfg: SuiteConfig, reasons: dict[str, str]) -> list[dict[str, Any]]:
    """Skipped rows with the backend's own reason, and the planned FLOPs on the slim rows."""
    flops = planned_flops(root, unit, cfg)
    rows = [r for p, why in reasons.items() for r in skip_rows(unit, cfg, [p], why)]
    return [{**r, **flops.get(r["variant"], {})} for r in rows]


def uses_onnx(stage: StageConfig) -> bool:
    """Whether the stage times the ONNX export on this machine (``ort`` on the CPU)."""
    return "ort" in stage.backends and "cpu" in stage.devices


def prime(artifact: Artifact, model_dir: Path) -> None:
    """Hand the artifact the ONNX file built ahead of time, so the ``ort`` backend does not export again."""
    from bench.backends.onnx_cache import seed_onnx

    if (model_dir / ONNX_FILE).is_file():
        seed_onnx(artifact, model_dir / ONNX_FILE)


class Builder:
    """Builds model directories in a worker process, ahead of the measurements."""

    def __init__(self, root: Path, cfg: SuiteConfig, units: list[Unit], *, workers: int = 1) -> None:
        self.root, self.cfg = root, cfg
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if workers else None
        self.futures: dict[tuple[str, int], Future[Path]] = {}
        self.onnx = {(u.point.name, u.rounding) for u in units if uses_onnx(u.stage)}
        for u in units:
            self._submit(u.point, u.rounding)

    def _submit(self, point: PointConfig, rounding: int) -> None:
        key = (point.name, rounding)
        if self.pool is not None and key not in self.futures:
            self.futures[key] = self.pool.submit(build_slim, self.root, self.cfg, point, rounding,
                                                 onnx=key in self.onnx)

    def slim(self, point: PointConfig, rounding: int) -> Path:
        """The slim directory, waiting for the worker (or building here without one)."""
        fut = self.futures.get((point.name, rounding))
        if fut is not None:
            return fut.result()
        return build_slim(self.root, self.cfg, point, rounding, onnx=(point.name, rounding) in self.onnx)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class Measurer:
    """Times units; keeps one base artifact per architecture so its ONNX export happens once."""

    def __init__(self, root: Path, cfg: SuiteConfig, builder: Builder) -> None:
        self.root, self.cfg, self.builder = root, cfg, builder
        self.bases: dict[str, Artifact] = {}

    def base(self, arch: str) -> Artifact:
        if arch not in self.bases:
            path = ensure_base(self.root, self.cfg, arch)
            self.bases[arch] = load_artifact(arch, path, self.root)
            if any(uses_onnx(s) for s in self.cfg.stages):
                ensure_onnx(path)
                prime(self.bases[arch], path)
        return self.bases[arch]

    def measure(self, unit: Unit, bcfg: BenchConfig) -> pd.DataFrame:
        """The bench rows of one unit (its sweep config ``bcfg``), with the suite's columns."""
        slim_path = self.builder.slim(unit.point, unit.rounding)
        slim = load_artifact("slim", slim_path, self.root)
        prime(slim, slim_path)
        environment = env.collect(threads=self.cfg.threads)
        sh: Shared = make_shared(self.base(unit.point.arch), slim, bcfg, environment)
        rows = [{**r, "clock": r.get("clock", bcfg.timing.clock), **unit_columns(unit, self.cfg)}
                for r in sweep(sh)]
        return table.to_frame(rows)


def unit_path(root: Path, unit: Unit) -> Path:
    return root / "units" / f"{unit.key}.csv"


def cached_unit(root: Path, unit: Unit) -> pd.DataFrame | None:
    """A unit measured by an earlier run. Units that timed nothing (cut for time, or skipped
    because a GPU or package was missing) are tried again: the rerun may be on the machine
    that has what they need."""
    path = unit_path(root, unit)
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df if (df["status"] == "ok").any() else None


def run_suite(cfg: SuiteConfig, out: str | Path, *, build_workers: int = 1) -> pd.DataFrame:
    """Build, measure (resuming from ``out/units``) and return the combined table."""
    root = Path(out)
    (root / "units").mkdir(parents=True, exist_ok=True)
    units = plan_units(cfg)
    t0, frames = time.monotonic(), []
    cached = {u.key: cached_unit(root, u) for u in units}  # each unit CSV read once
    todo = [u for u in units if cached[u.key] is None]
    builder = Builder(root, cfg, todo, workers=build_workers)
    measurer = Measurer(root, cfg, builder)
    try:
        with pinned_threads(cfg.threads):
            for unit in progress(units, desc="suite", unit="unit"):
                done = cached[unit.key]
                frames.append(done if done is not None else _one_unit(root, cfg, unit, measurer, t0))
    finally:
        builder.close()
    return table.to_frame(pd.concat(frames, ignore_index=True).to_dict(orient="records"))


def _one_unit(root: Path, cfg: SuiteConfig, unit: Unit, measurer: Measurer, t0: float) -> pd.DataFrame:
    """Measure (or skip, saying why) one unit not in the cache, and cache it."""
    bcfg = stage_config(cfg, unit.stage, unit.point)
    over = cfg.budget_minutes is not None and time.monotonic() - t0 > 60 * cfg.budget_minutes
    reasons = unavailable_reasons(bcfg)
    if reasons is not None:
        df = table.to_frame(unavailable_rows(root, unit, cfg, reasons))
    elif over:
        log.warning("%s: %s", unit.key, CUT_FOR_TIME)
        df = table.to_frame(skip_rows(unit, cfg, list(bcfg.precisions), CUT_FOR_TIME))
    else:
        log.info("measuring %s", unit.key)
        try:
            df = measurer.measure(unit, bcfg)
        except AllocationError as e:  # the target is out of reach with the crucial nodes kept
            log.error("%s: %s", unit.key, e)
            reason = f"AllocationError: {e}"
            df = table.to_frame(skip_rows(unit, cfg, list(bcfg.precisions), reason, status="error"))
    df.to_csv(unit_path(root, unit), index=False)
    return df


def suite_command(args: argparse.Namespace) -> str:
    """The command that reproduces this suite run (written into the page)."""
    parts = ["deploy-prune", "bench", "suite", args.config, *args.overrides, "--out", args.suite_out]
    parts += ["--results", args.results] if args.results else []
    parts += ["--data-root", args.data_root] if args.data_root else []
    return shlex.join(parts)


def cmd_suite(args: argparse.Namespace) -> int:
    """Run the suite; write the table, page and plot to --results (default: --out)."""
    from bench.studies.paper_claims.report import write_results

    overrides = list(args.overrides) + ([f"data_root={args.data_root}"] if args.data_root else [])
    cfg = load_suite(args.config, overrides)
    df = run_suite(cfg, args.suite_out, build_workers=args.build_workers)
    atomic_write_text(Path(args.suite_out) / "suite_table.csv", df.to_csv(index=False))
    notes = Path(args.notes).read_text() if args.notes else ""
    paths = write_results(df, Path(args.results or args.suite_out), cfg=cfg, command=suite_command(args),
                          notes=notes)
    ok = df[(df["status"] == "ok") & (df["variant"] == "slim")]
    print(f"{len(df)} rows ({len(ok)} measured slim rows) -> {', '.join(map(str, paths))}")
    return 0
