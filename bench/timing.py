"""Timing one backend call, and timing base and slim in interleaved rounds.

What each reference tool contributes, and what this adds for a pruned-vs-original comparison:

- trtexec: warm-up by time (``--warmUp``, 200 ms) before a timed phase of at least a duration
  *and* a number of iterations; host latency (with H2D/D2H copies) reported apart from GPU
  compute time; percentiles. Kept here: time-and-count warm-up and budget, ``e2e`` (host
  ``perf_counter_ns`` around upload, run and download) apart from ``device`` (CUDA events
  around ``run`` only).
- onnxruntime_perf_test: a fixed number of runs or a duration, pinned intra-op threads.
  Kept: threads pinned and recorded with every row.
- torch.utils.benchmark: replicates and medians rather than one mean, a fixed thread pool,
  CUDA synchronisation. Kept: medians per round, GC off while timing.
- MLPerf LoadGen (SingleStream): one query after the previous completes, tail percentiles from
  enough samples (its early-stopping floor for a p99 claim is 662 queries).
  Kept: sequential latency queries and a sample floor (``min_samples``) for p99.

None of them compares two models. Measuring base and slim in separate runs lets any slow drift
of a shared, busy machine (other jobs, clocks, heat) land on one model only. Here the two are
timed in the same process in alternating rounds (AB, BA, AB, ...): each round gives a paired
ratio of medians, and the speedup's bootstrap interval is taken over those paired ratios
(:func:`bench.stats.paired_speedup`). Each round starts with one untimed call, so the switch
from the other model (cold caches) is not charged to the first timed call.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.backends import Backend

ROUND_OVERRUN = 3.0  # a round may take this many times its planned time before it is cut short
# "wall": host wall clock (what a user waits). "cpu": this process's CPU time, which leaves out
# the time the OS gave the cores to other jobs; with one thread it is the latency the call
# would have on an idle core, the stable choice on a shared machine (see docs/bench.md).
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


@dataclass(frozen=True)
class TimingConfig:
    """How long and how often to measure: every threshold is met, whichever comes last, unless a
    busy machine cuts rounds short (the ``samples`` column then says how many calls were timed)."""

    warmup_s: float = 0.5  # warm-up lasts at least this long ...
    warmup_iters: int = 10  # ... and at least this many calls
    min_time_s: float = 2.0  # timed seconds per model and configuration, over all rounds
    rounds: int = 30  # interleaved rounds (paired ratios for the bootstrap)
    min_samples: int = 200  # timed calls per model at least (p99 needs >= 100 to mean anything)
    min_per_round: int = 3  # timed calls per model and round at least
    clock: str = "wall"  # a key of CLOCKS

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"timing.clock {self.clock!r}: expected one of {', '.join(CLOCKS)}")
        for key in ("warmup_s", "min_time_s"):
            if not getattr(self, key) >= 0 or getattr(self, key) == float("inf"):  # NaN fails >= too
                raise ValueError(f"timing.{key} must be finite and >= 0, got {getattr(self, key)}")
        for key in ("warmup_iters", "rounds", "min_samples", "min_per_round"):
            if getattr(self, key) < 1:
                raise ValueError(f"timing.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class Samples:
    """Per-round latencies of one model (milliseconds); ``device_ms`` only on CUDA."""

    e2e_ms: list[list[float]] = field(default_factory=list)
    device_ms: list[list[float]] = field(default_factory=list)

    def flat(self, kind: str = "e2e") -> np.ndarray:
        rounds = self.e2e_ms if kind == "e2e" else self.device_ms
        return np.asarray([v for r in rounds for v in r], dtype=np.float64)


class Timer:
    """Times one backend on one fixed host batch: e2e (host clock) and device (CUDA events)."""

    def __init__(self, backend: Backend, host: torch.Tensor, *, clock: str = "wall") -> None:
        self.backend = backend
        self.clock = CLOCKS[clock]
        self.cuda = backend.device == "cuda"
        self.host = host.pin_memory() if self.cuda else host  # (B, C, H, W) float32
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.stream = backend.timing_stream()  # fixed once prepared; not looked up per call

    def call(self) -> torch.Tensor:
        """One untimed inference: upload, run, download."""
        out = self.backend.download(self.backend.run(self.backend.upload(self.host)))
        if self.cuda:
            torch.cuda.synchronize()
        return out

    def once(self) -> tuple[float, float]:
        """One timed inference: (end-to-end ms incl. copies by ``clock``, device ms or NaN on CPU)."""
        t0 = self.clock()
        x = self.backend.upload(self.host)
        if self.cuda:
            self.start.record(self.stream)
        y = self.backend.run(x)
        if self.cuda:
            self.end.record(self.stream)
        self.backend.download(y)
        if self.cuda:
            torch.cuda.synchronize()
        e2e = (self.clock() - t0) / 1e6
        return e2e, (self.start.elapsed_time(self.end) if self.cuda else math.nan)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection pauses inside timed loops (as timeit does)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def warm_up(timer: Timer, cfg: TimingConfig) -> float:
    """Call until both ``warmup_s`` and ``warmup_iters`` are reached; mean ms of the later half.

    The first call may compile (torch.compile, TensorRT EP); it counts as one warm-up call. The
    mean (not the median) of the later calls sizes the rounds, so that a busy machine, whose
    stalls show in the mean, does not stretch the run far past its time budget.
    """
    times: list[float] = []
    t_end = time.perf_counter() + cfg.warmup_s
    while len(times) < cfg.warmup_iters or time.perf_counter() < t_end:
        times.append(timer.once()[0])
    return float(np.mean(times[len(times) // 2:]))


def calls_per_round(call_ms: float, cfg: TimingConfig) -> int:
    """Timed calls per round so the budget, the sample floor and the round floor all hold."""
    by_time = math.ceil(cfg.min_time_s * 1000.0 / cfg.rounds / max(call_ms, 1e-6))
    by_samples = math.ceil(cfg.min_samples / cfg.rounds)
    return max(cfg.min_per_round, by_time, by_samples)


def _one_round(timer: Timer, n: int, deadline_s: float, cfg: TimingConfig, into: Samples) -> None:
    """``n`` timed calls, or fewer (never below ``min_per_round``) once ``deadline_s`` passed."""
    timer.call()  # untimed: re-warm after the other model ran
    e2e: list[float] = []
    dev: list[float] = []
    t_end = time.perf_counter() + deadline_s
    while len(e2e) < n and (len(e2e) < cfg.min_per_round or time.perf_counter() < t_end):
        a, b = timer.once()
        e2e.append(a)
        dev.append(b)
    into.e2e_ms.append(e2e)
    if timer.cuda:
        into.device_ms.append(dev)


def measure_pair(base: Timer, slim: Timer, cfg: TimingConfig) -> tuple[Samples, Samples]:
    """Warm both up, then ``cfg.rounds`` interleaved rounds in AB, BA, AB, ... order.

    A round of one model stops early (keeping at least ``min_per_round`` calls) once it has
    taken ``ROUND_OVERRUN`` times its planned share of the budget, which bounds the wall time
    when the machine gets busy mid-run.
    """
    plan = []
    for timer in (base, slim):
        call_ms = warm_up(timer, cfg)
        n = calls_per_round(call_ms, cfg)
        plan.append((timer, n, ROUND_OVERRUN * n * call_ms / 1000.0))
    out_base, out_slim = Samples(), Samples()
    slots = [(*plan[0], out_base), (*plan[1], out_slim)]
    with gc_paused():
        for r in range(cfg.rounds):
            for timer, n, deadline, into in (slots if r % 2 == 0 else slots[::-1]):
                _one_round(timer, n, deadline, cfg, into)
    return out_base, out_slim
