"""Measuring cut variants of one base model on one backend, each paired against the base.

Every candidate (a plan of kept channels) is cut from the base, prepared on the backend and
timed in interleaved rounds against the base (:func:`bench.timing.measure_pair`); its latency is
``base_ms / paired speedup``. Pairing cancels the slow drift of a shared machine, so table
entries measured minutes apart stay comparable. On the CPU the probe times one thread's CPU
time (``clock="cpu"``, threads 1), the stable choice on a busy box (docs/bench.md).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import nn

from bench.backends import BACKENDS, Artifact, Backend, BackendOptions
from bench.env import cpu_model
from bench.stats import geometric_mean, round_ratios
from bench.timing import Timer, TimingConfig, measure_pair
from deploy_prune.allocation import cut
from deploy_prune.artifacts import ModelPlan
from deploy_prune.surgery import Plan

log = logging.getLogger(__name__)

# Short paired measurements for table entries; the closing check of the allocator uses CHECK.
QUICK = TimingConfig(warmup_s=0.2, warmup_iters=5, min_time_s=0.5, rounds=8, min_samples=40,
                     min_per_round=3)
CHECK = TimingConfig(warmup_s=0.3, warmup_iters=10, min_time_s=1.5, rounds=16, min_samples=120,
                     min_per_round=3)


def device_name(device: str) -> str:
    """The CPU model or the GPU name: what a latency table is valid for."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_model()


class Probe:
    """Times cut variants of ``model`` on one backend/device/precision/batch (a context manager)."""

    def __init__(self, model: nn.Module, plan: ModelPlan, *, backend: str, device: str,
                 precision: str, batch: int, seed: int = 0, workdir: str | Path | None = None) -> None:
        self.model, self.plan = model.cpu().eval(), plan
        self.backend_name, self.device, self.precision, self.batch = backend, device, precision, batch
        self.threads = 1 if device == "cpu" else torch.get_num_threads()
        self.clock = "cpu" if device == "cpu" else "wall"
        self.options = BackendOptions(threads=self.threads, max_batch=batch)
        cls = BACKENDS.get(backend)
        reason = cls.unavailable(device, precision, self.options)
        if reason:
            raise ValueError(f"latency backend {backend} on {device}/{precision} cannot run here: {reason}")
        self._tmp = tempfile.TemporaryDirectory(prefix="dp-latency-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        g = torch.Generator().manual_seed(seed)
        self.host = torch.randn(plan.example(batch).shape, generator=g)  # (B, C, H, W)
        self.base = self._prepare("base", self.model, plan)
        self.base_timer = Timer(self.base, self.host, clock=self.clock)
        self.base_ms = self._base_latency()
        self._n = 0

    def _prepare(self, name: str, model: nn.Module, plan: ModelPlan) -> Backend:
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        art = Artifact(name=name, path=workdir, model=model, plan=plan, workdir=workdir)
        backend = BACKENDS.get(self.backend_name)(device=self.device, precision=self.precision,
                                                  options=self.options)
        backend.prepare(art, plan.example(self.batch))
        return backend

    def _base_latency(self) -> float:
        """Median ms of the base model, timed against itself: both halves are base samples."""
        a, b = measure_pair(self.base_timer, self.base_timer, CHECK)
        return float(np.median(np.concatenate([a.flat(), b.flat()])))

    def speedup(self, kept: Plan, *, timing: TimingConfig = QUICK) -> float:
        """Paired speedup of the base cut to ``kept`` over the base (> 1: faster)."""
        self._n += 1
        slim = cut(self.model, kept, self.plan.example()).eval()
        plan = replace(self.plan, kept=kept, info={})
        backend = self._prepare(f"v{self._n}", slim, plan)
        try:
            timer = Timer(backend, self.host, clock=self.clock)
            base, cand = measure_pair(self.base_timer, timer, timing)
            # paired_speedup's point estimate; its bootstrap interval is not needed here
            return float(geometric_mean(round_ratios(base.e2e_ms, cand.e2e_ms)))
        finally:
            backend.close()

    def latency(self, kept: Plan, *, timing: TimingConfig = QUICK) -> float:
        """Latency (ms) of the cut variant, on the base's scale: ``base_ms / speedup``."""
        return self.base_ms / self.speedup(kept, timing=timing)

    def describe(self) -> dict[str, object]:
        return {"backend": self.backend_name, "device": self.device, "device_name": device_name(self.device),
                "precision": self.precision, "batch": self.batch, "threads": self.threads,
                "clock": self.clock}

    def close(self) -> None:
        self.base.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
