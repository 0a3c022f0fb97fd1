"""The steps of ``scripts/gpu-check.sh`` (one process each, so a step that hangs or dies is
time-boxed by the shell and never stops the others).

    python scripts/gpu_check.py env   --out DIR [--after] [--dry-run]
    python scripts/gpu_check.py pair  --out DIR --carry DIR [--dry-run]
    python scripts/gpu_check.py paper --out DIR [--dry-run]

``env``: the GPU, driver, CUDA, clocks and throttle reasons (NVML and ``nvidia-smi``), library
versions; ``--after`` adds a second reading after the load. ``pair``: the carried default
base/slim pair on CUDA (eager fp32 and fp16, torch.compile with CUDA graphs, AOTInductor) at
batch 1 and 256, with the top-1 of every timed artifact on the Fashion-MNIST test split. ``paper``:
ResNet-50 at 2.8x fewer FLOPs (OSPR's point; random weights, uniform widths), eager fp16
channels_last and torch.compile (CUDA graphs, fp16 channels_last) at batch 1 and 32.

Each step writes its files into ``--out`` after every finished part, so a step cut by its time
box keeps what it measured. ``--dry-run``: the same steps on a machine without CUDA, tiny sizes;
every CUDA row is a ``skipped`` row with its reason, and a CPU eager row exercises the timing and
accuracy paths. No figure is ever made up: what was not measured is a skipped or error row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the PYTHONPATH fallback when the editable install is unavailable

from bench import env as bench_env  # noqa: E402
from bench import sweep, table  # noqa: E402
from bench.timing import TimingConfig  # noqa: E402

log = logging.getLogger("gpu_check")
# artifacts and model directories: never under $OUT, which brings back 8 files at most
WORK = Path(os.environ.get("GPUCHECK_WORK", "/tmp/gpucheck-work"))
GPU_TIMING = TimingConfig(warmup_s=1.0, warmup_iters=20, min_time_s=1.0, rounds=10, min_samples=100,
                          min_per_round=5, clock="wall")
DRY_TIMING = TimingConfig(warmup_s=0.0, warmup_iters=1, min_time_s=0.02, rounds=2, min_samples=2,
                          min_per_round=1, clock="cpu")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def _nvidia_smi() -> dict[str, Any]:
    """``nvidia-smi`` readings (clocks, throttle reasons, power, temperature) or why there are none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": "skipped: nvidia-smi not found (no NVIDIA driver on this machine)"}
    query = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,"
             "power.limit,clocks_event_reasons.active,utilization.gpu,memory.used,memory.total")
    out: dict[str, Any] = {}
    for key, args in (("nvidia_smi_query", [f"--query-gpu={query}", "--format=csv"]),
                      ("nvidia_smi_performance", ["-q", "-d", "PERFORMANCE,CLOCK"])):
        try:
            res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
            out[key] = (res.stdout or res.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out[key] = f"failed: {type(e).__name__}: {e}"
    return out


def step_env(out: Path, *, after: bool, dry_run: bool) -> int:
    """``env.json``: the machine and GPU state (again after the load with ``--after``)."""
    import torch

    path = out / "env.json"
    data = json.loads(path.read_text()) if after and path.is_file() else {}
    reading = {"time": bench_env.now(), **bench_env.collect(threads=1), **_nvidia_smi(),
               "cuda_available": torch.cuda.is_available(), "dry_run": dry_run,
               "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        reading.update(gpu_capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                       gpu_multiprocessors=props.multi_processor_count)
    data["after" if after else "before"] = reading
    _write_json(path, data)
    for key in ("gpu_name", "gpu_driver", "cuda_driver", "gpu_sm_clock_mhz", "gpu_sm_clock_max_mhz",
                "gpu_throttle_reasons", "nvidia_smi"):
        if key in reading:
            print(f"{key}: {reading[key]}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    return 0


def _tiny_pair(root: Path) -> tuple[Path, Path]:
    """A random-weight small_vgg base and half-width slim (dry run without a carried pair)."""
    import torch

    from deploy_prune.artifacts import ModelPlan, save_model_dir
    from deploy_prune.models import build_model
    from deploy_prune.nodes import discover
    from deploy_prune.surgery import apply_plan

    torch.manual_seed(0)
    info = {"config": {"data": {"name": "fashion_mnist"}}}
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    base = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28, info=info), root / "base")
    example = torch.zeros(2, 1, 28, 28)
    kept = {n.name: list(range(n.channels // 2)) for n in discover(model, example) if n.prunable}
    apply_plan(model, kept, example)
    slim = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28, kept=kept, info=info), root / "slim")
    return base, slim


def _pair_runs(dry_run: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, BenchConfig fields) of the pair step, in priority order (fast eager rows first)."""
    cuda = {"devices": ("cuda",), "batches": (1, 8) if dry_run else (1, 256)}
    runs = [("eager", {**cuda, "backends": ("torch",), "precisions": ("fp32", "fp16")}),
            ("compile-cudagraphs", {**cuda, "backends": ("compile",), "precisions": ("fp32", "fp16"),
                                    "compile_mode": "reduce-overhead"}),
            ("aoti", {**cuda, "backends": ("aoti",), "precisions": ("fp32",)})]
    if dry_run:  # the timing and accuracy paths themselves, on the CPU
        runs.insert(0, ("cpu-eager", {"devices": ("cpu",), "batches": (1, 8), "backends": ("torch",),
                                      "precisions": ("fp32",)}))
    return runs


def step_pair(out: Path, carry: Path, *, dry_run: bool) -> int:
    """``pair.csv`` and ``pair.md``: the default pair's rows, rewritten after every run."""
    base, slim = carry / "pair" / "base", carry / "pair" / "slim"
    data_root = carry / "fashion-mnist"
    if not (base / "plan.json").is_file() or not (slim / "plan.json").is_file():
        if not dry_run:
            print(f"no carried pair under {carry}/pair: run scripts/prepare-gpu-carry.sh here first")
            return 2
        print(f"dry run: no carried pair under {carry}/pair; a random small_vgg pair stands in")
        base, slim = _tiny_pair(WORK / "tiny-pair")
    if not data_root.is_dir():
        data_root = None  # the loader's own search (the system Fashion-MNIST folder)
    frames: list[pd.DataFrame] = []
    environment = bench_env.collect(threads=1)
    for name, fields in _pair_runs(dry_run):
        timing = DRY_TIMING if dry_run else GPU_TIMING
        if "cuda" in fields["devices"]:
            timing = TimingConfig(**{**timing.__dict__, "clock": "wall"})
        cfg = sweep.BenchConfig(**fields, threads=1, timing=timing, accuracy=True, n_boot=500 if dry_run else 2000,
                                max_eval_samples=64 if dry_run else None,
                                data_root=str(data_root) if data_root else None)
        t0 = time.monotonic()
        df = sweep.run(base, slim, WORK / "pair" / name, cfg, command=f"scripts/gpu_check.py pair ({name})")
        frames.append(df.assign(check_run=name))
        both = pd.concat(frames, ignore_index=True)
        table_path = out / "pair.csv"
        both.to_csv(table_path.with_suffix(".tmp"), index=False)
        table_path.with_suffix(".tmp").replace(table_path)
        _pair_page(both, out / "pair.md", environment)
        print(f"pair {name}: {len(df)} rows ({', '.join(f'{k} {v}' for k, v in df['status'].value_counts().items())}) "
              f"in {time.monotonic() - t0:.0f}s")
    return 0


PAIR_COLUMNS = (("check_run", "run", ""), ("backend", "backend", ""), ("device", "device", ""),
                ("precision", "precision", ""), ("batch", "batch", ""), ("variant", "variant", ""),
                ("status", "status", ""), ("p50_ms", "p50 ms", ".4f"), ("device_p50_ms", "device p50 ms", ".4f"),
                ("speedup_text", "speedup [95% CI]", ""), ("device_speedup_text", "device speedup [95% CI]", ""),
                ("top1", "top-1 %", ".2f"), ("samples", "n", ".0f"), ("error", "reason", ""))


def _interval(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df:
        return ["-"] * len(df)
    return [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(v) else "-"
            for v, lo, hi in zip(df[col], df[f"{col}_ci_low"], df[f"{col}_ci_high"])]


def _pair_page(df: pd.DataFrame, path: Path, environment: dict[str, Any]) -> None:
    from bench.report import environment_lines, markdown_table

    view = df.assign(speedup_text=_interval(df, "speedup"), device_speedup_text=_interval(df, "device_speedup"))
    for col, _, _ in PAIR_COLUMNS:
        if col not in view:
            view[col] = None
    text = ["# gpu-check: the default pair", "", *environment_lines(environment), "",
            "Speedup: end to end (host<->device copies included; efficiency uses it); device speedup: "
            "CUDA events around the inference alone. top-1: the timed artifact itself on the "
            "Fashion-MNIST test split.", "", markdown_table(view, PAIR_COLUMNS), ""]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)


def _paper_config(dry_run: bool, stages: list[dict[str, Any]]) -> Any:
    from bench.studies.paper_claims.config import RESNET50_CRUCIAL, SuiteConfig
    from deploy_prune.config import from_dict

    timing = ({k: v for k, v in DRY_TIMING.__dict__.items()} if dry_run else
              {k: v for k, v in GPU_TIMING.__dict__.items()})
    timing["clock"] = "wall"
    cpu_timing = {**timing, "clock": "cpu"}
    return from_dict(SuiteConfig, {
        "input_size": 32 if dry_run else 224, "num_classes": 10 if dry_run else 1000, "in_channels": 3,
        "points": [{"arch": "resnet50", "flops_reduction": 2.8, "source": "OSPR", "crucial": list(RESNET50_CRUCIAL)}],
        "stages": stages, "gpu_timing": timing, "timing": cpu_timing, "threads": 1, "repeats": 1})


def paper_stages(dry_run: bool) -> list[dict[str, Any]]:
    batches = [1, 8] if dry_run else [1, 32]
    common = {"devices": ["cuda"], "precisions": ["fp16"], "channels_last": True, "batches": batches,
              "roundings": [8]}
    stages = [{"name": "gpu-eager-fp16-cl", "backends": ["torch"], **common},
              {"name": "gpu-compile-fp16-cl", "backends": ["compile"], "compile_mode": "reduce-overhead", **common}]
    if dry_run:  # builds and prunes the ResNet-50 and times it on the CPU: the path the GPU stages take
        stages.insert(0, {"name": "cpu-eager-fp32", "backends": ["torch"], "batches": [1], "roundings": [8]})
    return stages


def step_paper(out: Path, *, dry_run: bool) -> int:
    """``resnet50.csv`` and ``resnet50.md``: the paper point, stage by stage (eager first)."""
    from bench.studies.paper_claims.report import write_results
    from bench.studies.paper_claims.suite import run_suite

    stages = paper_stages(dry_run)
    work = WORK / "paper"
    for n in range(1, len(stages) + 1):  # the suite resumes finished units from work/units
        cfg = _paper_config(dry_run, stages[:n])
        t0 = time.monotonic()
        df = run_suite(cfg, work, build_workers=0)
        table.write(df, work)  # results.csv / results.json: every row, skipped ones too
        paths = write_results(df, work / "page", cfg=cfg, command="scripts/gpu-check.sh (paper step)")
        page = paths[1].read_text().replace("![FLOPs reduction vs measured speedup](paper_claims.png)",
                                            "(plot not brought back: 8 files at most)")
        (out / "resnet50.tmp").write_text(page)
        (out / "resnet50.tmp").replace(out / "resnet50.md")
        df.to_csv(out / "resnet50.tmp", index=False)  # every row (the page's CSV keeps measured ones only)
        (out / "resnet50.tmp").replace(out / "resnet50.csv")
        counts = ", ".join(f"{k} {v}" for k, v in df["status"].value_counts().items())
        print(f"paper {stages[n - 1]['name']}: {counts} in {time.monotonic() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("env", "pair", "paper"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--carry", type=Path, default=ROOT / ".gpucheck")
    p.add_argument("--after", action="store_true", help="env: a second reading, after the load")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; CUDA rows are skipped with reasons")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.step == "env":
        return step_env(args.out, after=args.after, dry_run=args.dry_run)
    if args.step == "pair":
        return step_pair(args.out, args.carry, dry_run=args.dry_run)
    return step_paper(args.out, dry_run=args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
