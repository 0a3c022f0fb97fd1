"""The ``bench suite`` config: which operating points to build, and what to measure on each.

A YAML file (``configs/bench/paper_claims.yaml``) is a small override of these defaults,
validated by :func:`deploy_prune.config.from_dict`: unknown keys and wrong types are errors
that name the key. The defaults are the papers' operating points (METHOD.md section 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.backends import BACKENDS, DEVICES, PRECISIONS
from bench.timing import TimingConfig
from deploy_prune.config import ConfigError, load_config

SOURCES = ("OSPR", "RBP")
VGG16_CRUCIAL = ["features.24", "features.26", "features.28"]  # conv5_1, conv5_2, conv5_3
RESNET50_CRUCIAL = ["layer1.2", "layer2.3", "layer3.5", "layer4.2"]  # res2c, res3d, res4f, res5c


@dataclass
class PointConfig:
    """One operating point: a model pruned to a FLOPs reduction, as one paper reports it."""

    arch: str  # a registered model (deploy_prune.models), e.g. vgg16, resnet50
    flops_reduction: float  # 4.4 = 4.4x fewer FLOPs
    source: str = "OSPR"  # OSPR | RBP: which paper claims this point
    crucial: list[str] | None = None  # nodes kept whole; None: only the last conv node (required)

    @property
    def name(self) -> str:
        """Directory-safe label, e.g. ``vgg16-OSPR-4.4x``."""
        return f"{self.arch}-{self.source}-{self.flops_reduction:g}x"


@dataclass(frozen=True)
class SuiteTiming(TimingConfig):
    """:class:`bench.timing.TimingConfig` (the same fields and checks) with the suite's shorter
    defaults: many units, each timed briefly, on one thread's CPU clock."""

    warmup_s: float = 0.0
    warmup_iters: int = 2
    min_time_s: float = 1.0
    rounds: int = 5
    min_samples: int = 10
    min_per_round: int = 2
    clock: str = "cpu"  # cpu: one thread's CPU time, stable on a shared machine (docs/bench.md)


@dataclass
class StageConfig:
    """One block of measurements: backends x devices x precisions x batches, for some roundings."""

    name: str
    backends: list[str] = field(default_factory=lambda: ["ort"])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1])
    roundings: list[int] = field(default_factory=lambda: [8])
    channels_last: bool = False
    compile_mode: str = "default"
    timing: SuiteTiming | None = None  # None: the suite's timing


def _default_points() -> list[PointConfig]:
    ospr_vgg = [PointConfig("vgg16", r, "OSPR", list(VGG16_CRUCIAL)) for r in (4.4, 5.0, 6.0, 7.0)]
    ospr_rn = [PointConfig("resnet50", r, "OSPR", list(RESNET50_CRUCIAL)) for r in (2.8, 3.0, 4.0, 5.0)]
    return [*ospr_vgg, PointConfig("vgg16", 5.0, "RBP"), *ospr_rn, PointConfig("resnet50", 2.2, "RBP")]


def _default_stages() -> list[StageConfig]:
    return [StageConfig("cpu-ort-b1", ["ort"], batches=[1], roundings=[8, 1, 32]),
            StageConfig("cpu-torch-b1-b8", ["torch"], batches=[1, 8], roundings=[8]),
            StageConfig("cpu-ort-b8", ["ort"], batches=[8], roundings=[8])]


@dataclass
class SuiteConfig:
    """What ``deploy-prune bench suite`` builds and measures."""

    input_size: int = 224
    num_classes: int = 1000
    in_channels: int = 3
    points: list[PointConfig] = field(default_factory=_default_points)
    stages: list[StageConfig] = field(default_factory=_default_stages)
    timing: SuiteTiming = field(default_factory=SuiteTiming)
    threads: int = 1  # CPU threads, pinned; the cpu clock needs 1
    data_root: str | None = None  # ImageNet folder (train/, val/): widths from beta scores
    scoring_epochs: float = 0.05  # beta scoring budget with data_root (epochs of the train split)
    scoring_batch_size: int = 64
    min_fraction: float = 0.05  # per-node minimum kept fraction
    tolerance: float = 0.03  # relative tolerance on the FLOPs target
    budget_minutes: float | None = None  # stop starting measurements after this; rows say so
    # Independent sessions per unit, each in its own pass over all units (minutes apart). The
    # reported interval is the envelope of their 95% intervals: run-to-run variation, which one
    # session's interval does not see (docs/bench.md, "Reproducing a suite").
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_suite(self)


def _check(key: str, values: list, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{key}: {bad or values!r} not allowed; expected one or more of {', '.join(map(str, allowed))}")


def check_suite(cfg: SuiteConfig) -> None:
    """Values the types alone do not catch, each error naming its key."""
    if not cfg.points:
        raise ConfigError("points: at least one operating point is needed")
    for i, p in enumerate(cfg.points):
        if p.source not in SOURCES:
            raise ConfigError(f"points[{i}].source: expected one of {', '.join(SOURCES)}, got {p.source!r}")
        if p.flops_reduction < 1.0:
            raise ConfigError(f"points[{i}].flops_reduction must be >= 1, got {p.flops_reduction}")
    for i, s in enumerate(cfg.stages):
        _check(f"stages[{i}].backends", s.backends, tuple(BACKENDS.names()))
        _check(f"stages[{i}].devices", s.devices, DEVICES)
        _check(f"stages[{i}].precisions", s.precisions, PRECISIONS)
        if not s.batches or min(s.batches) < 1:
            raise ConfigError(f"stages[{i}].batches must be >= 1, got {s.batches}")
        if not s.roundings or min(s.roundings) < 1:
            raise ConfigError(f"stages[{i}].roundings must be >= 1, got {s.roundings}")
    if len({s.name for s in cfg.stages}) != len(cfg.stages):
        raise ConfigError(f"stages: names must be unique, got {[s.name for s in cfg.stages]}")
    if cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {cfg.repeats}")


def load_suite(path: str | Path | None, overrides: list[str] | None = None) -> SuiteConfig:
    """Defaults <- YAML file <- dotted overrides, validated into a :class:`SuiteConfig`."""
    return load_config(path, overrides, cls=SuiteConfig)
