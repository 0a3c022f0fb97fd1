"""The slowdown guard's measurement: base and slim timed in interleaved rounds on one backend.

Called by ``deploy_prune.speed`` through the ``deploy_prune.checks`` entry point (the core never
imports bench). A few seconds on the CPU: short paired rounds (:data:`GUARD`), one thread and
the CPU-time clock, the setting that is stable on a busy machine (docs/bench.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.backends import BACKENDS, Artifact, BackendOptions
from bench.stats import paired_speedup
from bench.timing import Timer, TimingConfig, measure_pair
from deploy_prune.artifacts import ModelPlan

GUARD = TimingConfig(warmup_s=0.2, warmup_iters=5, min_time_s=0.6, rounds=10, min_samples=40,
                     min_per_round=3)


def measure(base: nn.Module, base_plan: ModelPlan, slim: nn.Module, slim_plan: ModelPlan, *,
            backend: str = "ort", device: str = "cpu", precision: str = "fp32", batch: int = 1,
            timing: TimingConfig = GUARD, seed: int = 0) -> dict[str, Any]:
    """Paired speedup of ``slim`` over ``base`` (> 1: faster) with its 95% interval and p50s."""
    threads = 1 if device == "cpu" else torch.get_num_threads()
    clock = "cpu" if device == "cpu" else "wall"
    options = BackendOptions(threads=threads, max_batch=batch)
    cls = BACKENDS.get(backend)
    reason = cls.unavailable(device, precision, options)
    if reason:
        raise RuntimeError(f"{backend} on {device}/{precision} cannot run here: {reason}")
    g = torch.Generator().manual_seed(seed)
    host = torch.randn(base_plan.example(batch).shape, generator=g)  # (B, C, H, W)
    prepared = []
    with tempfile.TemporaryDirectory(prefix="dp-guard-") as tmp:
        try:
            for name, model, plan in (("base", base, base_plan), ("slim", slim, slim_plan)):
                workdir = Path(tmp) / name
                workdir.mkdir()
                art = Artifact(name=name, path=workdir, model=model.cpu().eval(), plan=plan, workdir=workdir)
                b = cls(device=device, precision=precision, options=options)
                prepared.append(b)
                b.prepare(art, plan.example(batch))
            timers = [Timer(b, host, clock=clock) for b in prepared]
            with torch.no_grad():
                a, s = measure_pair(timers[0], timers[1], timing)
        finally:
            for b in prepared:
                b.close()
    sp = paired_speedup(a.e2e_ms, s.e2e_ms, seed=seed)
    return {"speedup": sp.value, "low": sp.low, "high": sp.high, "rounds": sp.rounds,
            "base_ms": float(torch.tensor(a.flat()).median()), "slim_ms": float(torch.tensor(s.flat()).median()),
            "backend": backend, "device": device, "precision": precision, "batch": batch,
            "threads": threads, "clock": clock}
