"""The benchmark run: base and slim model directories in, the tidy results table out.

For every backend x device x precision the two artifacts are prepared once; for every batch
size they are timed in interleaved rounds (:mod:`bench.timing`) and give two rows, ``base``
and ``slim``; the slim row carries the paired speedup, its bootstrap interval and the
efficiency (speedup / FLOPs reduction). An unavailable combination gives ``skipped`` rows with
the reason; a failing one (export error, out of memory) gives ``error`` rows and the sweep
goes on.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from bench import accuracy, env, table
from bench.backends import BACKENDS, DEVICES, PRECISIONS, Artifact, Backend, BackendOptions
from bench.stats import Speedup, paired_speedup, summarize
from bench.timing import Samples, Timer, TimingConfig, measure_pair
from deploy_prune.artifacts import atomic_write_text, load_model_dir
from deploy_prune.flops import count
from deploy_prune.host import cpu_count
from deploy_prune.progress import progress

log = logging.getLogger(__name__)
VARIANTS = ("base", "slim")


@dataclass(frozen=True)
class BenchConfig:
    """What to sweep and how to measure it (the ``deploy-prune bench`` options)."""

    backends: tuple[str, ...] = ("torch", "ort")
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    batches: tuple[int, ...] = (1, 8)
    threads: int | None = 1  # CPU threads (1, as torch.utils.benchmark pins); None: every usable core
    channels_last: bool = False
    compile_mode: str = "default"
    timing: TimingConfig = field(default_factory=TimingConfig)
    accuracy: bool = False
    max_eval_samples: int | None = None
    data_root: str | None = None
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0
    model_name: str | None = None  # the ``model`` column; default: the slim plan's arch

    def __post_init__(self) -> None:
        for name in self.backends:
            BACKENDS.get(name)  # KeyError naming the known backends
        _check_choices("device", self.devices, DEVICES)
        _check_choices("precision", self.precisions, PRECISIONS)
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.timing.clock == "cpu" and (self.threads != 1 or "cuda" in self.devices):
            raise ValueError("the cpu clock times one thread's work on the CPU: use it with "
                             "threads=1 (--threads 1) and device cpu only")

    def options(self) -> BackendOptions:
        return BackendOptions(threads=self.threads or cpu_count(), channels_last=self.channels_last,
                              compile_mode=self.compile_mode, max_batch=max(self.batches))


def _check_choices(what: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{what} {bad or values!r}: expected one or more of {', '.join(allowed)}")


@dataclass
class Shared:
    """What every row of one run carries: model label, FLOPs per variant, environment."""

    cfg: BenchConfig
    model: str
    artifacts: dict[str, Artifact]
    flops: dict[str, int]
    params: dict[str, int]
    env: dict[str, Any]

    @property
    def flops_reduction(self) -> float:
        return self.flops["base"] / self.flops["slim"]


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the run, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_artifact(name: str, path: str | Path, out: Path) -> Artifact:
    """A model directory rebuilt (eval, CPU, fp32) with its work directory under ``OUT``."""
    model, plan = load_model_dir(path)
    workdir = out / "artifacts" / name
    workdir.mkdir(parents=True, exist_ok=True)
    return Artifact(name=name, path=Path(path), model=model, plan=plan, workdir=workdir)


def _io_shape(a: Artifact) -> tuple[int, int, int]:
    return a.plan.in_channels, a.plan.input_size, a.plan.num_classes


def make_shared(base: Artifact, slim: Artifact, cfg: BenchConfig, environment: dict[str, Any]) -> Shared:
    """FLOPs counted on the rebuilt models (batch 1), plus the run's label and environment."""
    if _io_shape(base) != _io_shape(slim):
        raise ValueError(f"base {base.path} and slim {slim.path} take or give different shapes "
                         f"((channels, size, classes) {_io_shape(base)} vs {_io_shape(slim)})")
    arts = {"base": base, "slim": slim}
    # counted once per artifact: the suite reuses one base artifact for many units
    costs = {k: a.cached("cost", lambda a=a: count(a.model, a.plan.example())) for k, a in arts.items()}
    if costs["slim"].flops <= 0:
        raise ValueError(f"{slim.path}: the slim model counts 0 FLOPs; cannot form a reduction")
    return Shared(cfg=cfg, model=cfg.model_name or slim.plan.arch, artifacts=arts,
                  flops={k: c.flops for k, c in costs.items()},
                  params={k: c.params for k, c in costs.items()}, env=environment)


def row_identity(sh: Shared, variant: str, backend: str, device: str, precision: str,
                 batch: int) -> dict[str, Any]:
    """The columns a row has whatever its status: what was measured, where, and its FLOPs."""
    art, e, v = sh.artifacts[variant], sh.env, sh.env["versions"]
    return {"model": sh.model, "variant": variant, "backend": backend, "device": device,
            "precision": precision, "batch": batch, "flops": sh.flops[variant],
            "params": sh.params[variant],
            "flops_reduction": sh.flops_reduction if variant == "slim" else 1.0,
            "threads": e["threads"], "model_dir": str(art.path), "plan_sha256": art.plan.digest(),
            "cpu_model": e["cpu_model"], "load_avg_1m": e["load_avg_1m"],
            "gpu_name": e.get("gpu_name"), "gpu_driver": e.get("gpu_driver"),
            "cuda_driver": e.get("cuda_driver"), "cuda_runtime": v.get("cuda_runtime"),
            "torch_version": v.get("torch"), "onnxruntime_version": v.get("onnxruntime"),
            "timestamp": env.now()}


def status_rows(sh: Shared, backend: str, device: str, precision: str, *, status: str,
                message: str) -> list[dict[str, Any]]:
    """``skipped`` or ``error`` rows (both variants, every batch) carrying ``message``."""
    return [{**row_identity(sh, v, backend, device, precision, b), "status": status, "error": message}
            for b in sh.cfg.batches for v in VARIANTS]


def latency_fields(samples: Samples, batch: int) -> dict[str, Any]:
    """Percentiles (end-to-end), device-time figures (CUDA only) and throughput of one variant."""
    s = summarize(samples.flat("e2e"))
    out = {"p50_ms": s.p50, "p90_ms": s.p90, "p99_ms": s.p99, "mean_ms": s.mean, "std_ms": s.std,
           "min_ms": s.min, "max_ms": s.max, "samples": s.n, "rounds": len(samples.e2e_ms),
           "calls_per_round": len(samples.e2e_ms[0]),
           "throughput_ips": batch * 1000.0 / s.mean}
    if samples.device_ms:
        d = summarize(samples.flat("device"))
        out.update(device_p50_ms=d.p50, device_mean_ms=d.mean)
    return out


def speedup_fields(sp: Speedup, flops_reduction: float, prefix: str = "") -> dict[str, Any]:
    """The slim row's speedup columns (``device_`` prefix: from CUDA events); efficiency too."""
    out = {f"{prefix}speedup": sp.value, f"{prefix}speedup_ci_low": sp.low,
           f"{prefix}speedup_ci_high": sp.high}
    if not prefix:
        out["efficiency"] = sp.value / flops_reduction
    return out


def host_batch(art: Artifact, batch: int, seed: int) -> torch.Tensor:
    """A fixed random input (B, C, H, W), identical for base and slim."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(art.plan.example(batch).shape, generator=g)


def measure_batch(sh: Shared, pair: dict[str, Backend], batch: int) -> list[dict[str, Any]]:
    """Time base and slim at one batch size; two ``ok`` rows."""
    cfg = sh.cfg
    host = host_batch(sh.artifacts["base"], batch, cfg.seed)
    timers = [Timer(pair[v], host, clock=cfg.timing.clock) for v in VARIANTS]
    samples = dict(zip(VARIANTS, measure_pair(*timers, cfg.timing)))
    boot = {"confidence": cfg.confidence, "n_boot": cfg.n_boot, "seed": cfg.seed}
    slim_extra = speedup_fields(paired_speedup(samples["base"].e2e_ms, samples["slim"].e2e_ms, **boot),
                                sh.flops_reduction)
    if samples["base"].device_ms:
        dev = paired_speedup(samples["base"].device_ms, samples["slim"].device_ms, **boot)
        slim_extra.update(speedup_fields(dev, sh.flops_reduction, prefix="device_"))
    gpu = env.gpu_state() if pair["base"].device == "cuda" else {}
    rows = []
    for v in VARIANTS:
        b = pair[v]
        row = {**row_identity(sh, v, b.name, b.device, b.precision, batch), **b.describe(),
               **latency_fields(samples[v], batch), **gpu, "status": "ok",
               "confidence": cfg.confidence, "clock": cfg.timing.clock}
        rows.append({**row, **(slim_extra if v == "slim" else {})})
    return rows


def prepare_pair(sh: Shared, name: str, device: str, precision: str) -> dict[str, Backend]:
    """One backend instance per variant, prepared on a seeded random example (batch 2)."""
    cls, opts = BACKENDS.get(name), sh.cfg.options()
    pair: dict[str, Backend] = {}
    for v in VARIANTS:
        art = sh.artifacts[v]
        backend = cls(device=device, precision=precision, options=opts)
        backend.prepare(art, host_batch(art, 2, sh.cfg.seed))
        pair[v] = backend
    return pair


def one_line(e: BaseException) -> str:
    """An exception as ``Type: first line`` (at most 300 characters) for the error column."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def failure_status(e: BaseException) -> str:
    """``skipped`` for export's BackendUnavailableError (a missing package or device), else ``error``."""
    try:
        from export.errors import BackendUnavailableError
    except ImportError:
        return "error"
    return "skipped" if isinstance(e, BackendUnavailableError) else "error"


def _release(pair: dict[str, Backend]) -> None:
    for b in pair.values():
        b.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_accuracy(sh: Shared, pair: dict[str, Backend], rows: list[dict[str, Any]]) -> None:
    """Top-1 of each prepared artifact, written into its rows of this combination."""
    size = max(sh.cfg.batches)
    for v, backend in pair.items():
        art = sh.artifacts[v]
        fields: dict[str, Any]
        try:
            data = art.cached("eval", lambda a=art: accuracy.eval_set(
                a.plan, max_samples=sh.cfg.max_eval_samples, data_root=sh.cfg.data_root))
            acc, n = accuracy.top1(backend, data, batch_size=size)
            fields = {"top1": acc, "top1_samples": n}
        except Exception as e:  # no dataset here, a backend that cannot take the batch, ...
            log.warning("accuracy of %s on %s failed: %s", v, backend.name, e)
            fields = {"accuracy_error": one_line(e)}
        for row in rows:
            if row["variant"] == v:
                row.update(fields)


def run_combo(sh: Shared, name: str, device: str, precision: str, bar: tqdm) -> list[dict[str, Any]]:
    """Rows for one backend x device x precision over every batch size."""
    reason = BACKENDS.get(name).unavailable(device, precision, sh.cfg.options())
    if reason:
        bar.update(len(sh.cfg.batches))
        log.info("skipped %s/%s/%s: %s", name, device, precision, reason)
        return status_rows(sh, name, device, precision, status="skipped", message=reason)
    pair: dict[str, Backend] = {}
    try:
        pair = prepare_pair(sh, name, device, precision)
    except Exception as e:
        status = failure_status(e)
        log.warning("preparing %s/%s/%s: %s: %s", name, device, precision, status, e,
                    exc_info=status == "error")
        bar.update(len(sh.cfg.batches))
        _release(pair)
        return status_rows(sh, name, device, precision, status=status, message=one_line(e))
    try:
        rows = [r for b in sh.cfg.batches for r in _batch_rows(sh, pair, name, device, precision, b, bar)]
        if sh.cfg.accuracy:
            add_accuracy(sh, pair, rows)
        return rows
    finally:
        _release(pair)


def _batch_rows(sh: Shared, pair: dict[str, Backend], name: str, device: str, precision: str,
                batch: int, bar: tqdm) -> list[dict[str, Any]]:
    bar.set_postfix_str(f"{name} {device} {precision} b{batch}")
    try:
        return measure_batch(sh, pair, batch)
    except Exception as e:  # out of memory, a shape the artifact refuses, ...
        log.warning("%s/%s/%s batch %d failed: %s", name, device, precision, batch, e)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [{**row_identity(sh, v, name, device, precision, batch), "status": "error",
                 "error": one_line(e)} for v in VARIANTS]
    finally:
        bar.update(1)


def sweep(sh: Shared) -> list[dict[str, Any]]:
    """Every backend x device x precision x batch of the config, with a progress bar."""
    cfg = sh.cfg
    combos = [(b, d, p) for b in cfg.backends for d in cfg.devices for p in cfg.precisions]
    rows: list[dict[str, Any]] = []
    with progress(total=len(combos) * len(cfg.batches), desc="bench", unit="config") as bar:
        for name, device, precision in combos:
            rows += run_combo(sh, name, device, precision, bar)
    return rows


def warn_if_busy(environment: dict[str, Any], cfg: BenchConfig) -> None:
    """Say so when other jobs already load the CPU: wall-clock ratios will drift with them."""
    load, cores = environment.get("load_avg_1m"), environment.get("cpu_count") or 1
    if cfg.timing.clock == "wall" and isinstance(load, float) and load > 0.75 * cores:
        log.warning("the CPU is busy (1-min load %.1f on %d cores): wall-clock latencies and "
                    "speedups will move with the other jobs; --clock cpu --threads 1 ignores them",
                    load, cores)


def run(base_dir: str | Path, slim_dir: str | Path, out: str | Path, cfg: BenchConfig | None = None,
        *, command: str | None = None) -> pd.DataFrame:
    """Benchmark ``slim_dir`` against ``base_dir``; write results, environment and report to ``out``."""
    from bench import report

    cfg = cfg or BenchConfig()
    out = Path(out)
    threads = cfg.options().threads
    with pinned_threads(threads):
        environment = env.collect(threads=threads)
        warn_if_busy(environment, cfg)
        base, slim = load_artifact("base", base_dir, out), load_artifact("slim", slim_dir, out)
        sh = make_shared(base, slim, cfg, environment)
        df = table.to_frame(sweep(sh))
    table.write(df, out)
    meta = {"command": command, "config": asdict(cfg), "environment": environment}
    atomic_write_text(out / "environment.json", json.dumps(meta, indent=1, default=str) + "\n")
    report.render(df, out, environment=environment, command=command)
    return df
