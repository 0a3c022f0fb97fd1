"""Config validation at load time: value ranges and registry names, before any work starts.

A typo in ``recovery.loss`` or ``train.lr=nan`` used to surface only when its stage started
(after the whole base training) or never (a NaN model saved as a baseline). Every check here
raises :class:`~deploy_prune.config.ConfigError` naming the key.
"""

from __future__ import annotations

import math
import re
from typing import Any

from deploy_prune.config import ConfigError, RunConfig, register_validator

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
COLLAPSE = ("mean", "one")
ALLOCATION_METHODS = ("global", "uniform")
CRUCIAL_SELECT = ("score", "per_stage")


def _num(key: str, v: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, optional: bool = False) -> None:
    if v is None:
        if optional:
            return
        raise ConfigError(f"{key}: a value is required, got null")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{key}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{key}: must be {'<' if hi_open else '<='} {hi}, got {v}")


def _choice(key: str, v: Any, choices: tuple[str, ...] | list[str]) -> None:
    if v not in choices:
        raise ConfigError(f"{key}: unknown value {v!r}; choose from {', '.join(choices)}")


def _registry(key: str, v: str, registry) -> None:
    try:
        registry.get(v)
    except KeyError:
        raise ConfigError(f"{key}: unknown {registry.kind} {v!r}; known: {', '.join(registry.names())}") from None


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Check every range and registry-named value of ``cfg``; returns it unchanged."""
    from deploy_prune.allocation import ALLOCATION_TARGETS, ALLOCATOR_GROUP
    from deploy_prune.data import DATASETS
    from deploy_prune.models import get_spec
    from deploy_prune.recovery import MIMIC_LOSSES, RECOVERY_MODES
    from deploy_prune.scoring import SCORERS

    if not DEVICE_RE.match(str(cfg.device)):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _num("threads", cfg.threads, lo=1, optional=True)

    d = cfg.data
    _registry("data.name", d.name, DATASETS)
    _num("data.val_fraction", d.val_fraction, lo=0, hi=1, hi_open=True)
    _num("data.max_train_samples", d.max_train_samples, lo=1, optional=True)
    _num("data.max_eval_samples", d.max_eval_samples, lo=1, optional=True)
    _num("data.batch_size", d.batch_size, lo=1)
    _num("data.eval_batch_size", d.eval_batch_size, lo=1)
    _num("data.num_workers", d.num_workers, lo=0)
    _num("data.image_size", d.image_size, lo=1, hi=4096, optional=True)
    _num("data.resize", d.resize, lo=0, hi=8192, optional=True)
    _num("data.channels", d.channels, lo=1, hi=3, optional=True)
    for key in ("mean", "std"):
        for i, v in enumerate(getattr(d, key) or []):
            _num(f"data.{key}[{i}]", v, lo=0 if key == "std" else None, lo_open=key == "std")

    if not str(cfg.model.arch).startswith("custom:"):  # a user's own class: built in Python, not here
        try:
            get_spec(cfg.model.arch)
        except KeyError as e:  # the models module's message suggests the closest names
            raise ConfigError(f"model.arch: {e.args[0] if e.args else e}") from None

    t = cfg.train
    _num("train.epochs", t.epochs, lo=0)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _num("train.lr", t.lr, lo=0, lo_open=True)
    _num("train.momentum", t.momentum, lo=0, hi=1, hi_open=True)
    _num("train.weight_decay", t.weight_decay, lo=0)
    _choice("train.schedule", t.schedule, SCHEDULES)
    _num("train.step_size", t.step_size, lo=1)
    _num("train.gamma", t.gamma, lo=0, lo_open=True)
    _num("train.label_smoothing", t.label_smoothing, lo=0, hi=1, hi_open=True)

    s = cfg.scoring
    _registry("scoring.method", s.method, SCORERS)
    _num("scoring.l1_lambda", s.l1_lambda, lo=0)
    _num("scoring.lr", s.lr, lo=0, lo_open=True)
    _num("scoring.epochs", s.epochs, lo=0)
    _num("scoring.batch_size", s.batch_size, lo=1, optional=True)
    r = s.rbp
    _num("scoring.rbp.prior_std", r.prior_std, lo=0, lo_open=True)
    _num("scoring.rbp.init_log_sigma", r.init_log_sigma)
    _num("scoring.rbp.kl_weight", r.kl_weight, lo=0)
    _num("scoring.rbp.epochs_per_layer", r.epochs_per_layer, lo=0)
    _num("scoring.rbp.probe_epochs", r.probe_epochs, lo=0)
    _num("scoring.rbp.lr", r.lr, lo=0, lo_open=True)
    _num("scoring.rbp.threshold", r.threshold, optional=True)
    _choice("scoring.rbp.collapse", r.collapse, COLLAPSE)

    if cfg.crucial.nodes is None:  # an explicit list replaces the top-N choice
        _num("crucial.n", cfg.crucial.n, lo=2)
    _choice("crucial.select", cfg.crucial.select, CRUCIAL_SELECT)

    a = cfg.allocation
    try:
        ALLOCATION_TARGETS.get(a.target)
    except KeyError:
        from importlib.metadata import entry_points

        known = ALLOCATION_TARGETS.names() + sorted(ep.name for ep in entry_points(group=ALLOCATOR_GROUP))
        raise ConfigError(f"allocation.target: unknown allocation target {a.target!r}; known: "
                          f"{', '.join(known)}") from None
    _choice("allocation.method", a.method, ALLOCATION_METHODS)
    _choice("allocation.normalize", a.normalize, ("auto", "none", "mean"))
    _num("allocation.flops_reduction", a.flops_reduction, lo=1)
    _num("allocation.keep_fraction", a.keep_fraction, lo=0, hi=1, lo_open=True)
    _num("allocation.tolerance", a.tolerance, lo=0, hi=1, hi_open=True)
    _num("allocation.min_channels", a.min_channels, lo=1)
    _num("allocation.min_fraction", a.min_fraction, lo=0, hi=1)
    if a.round_to != "auto":
        if isinstance(a.round_to, str):
            raise ConfigError(f"allocation.round_to: expected auto or a whole number >= 1, got {a.round_to!r}")
        _num("allocation.round_to", a.round_to, lo=1)
    _num("allocation.speedup", a.speedup, lo=0, lo_open=True)
    _num("allocation.latency_ms", a.latency_ms, lo=0, lo_open=True, optional=True)
    _choice("allocation.device", str(a.device).split(":")[0], ("cpu", "cuda"))
    _num("allocation.batch", a.batch, lo=1)
    _num("allocation.grid", a.grid, lo=2)

    rc = cfg.recovery
    _registry("recovery.mode", rc.mode, RECOVERY_MODES)
    _registry("recovery.loss", rc.loss, MIMIC_LOSSES)
    _num("recovery.epochs", rc.epochs, lo=0)
    _num("recovery.lr", rc.lr, lo=0, lo_open=True)
    _num("recovery.step_size", rc.step_size, lo=1)
    _num("recovery.gamma", rc.gamma, lo=0, lo_open=True)
    _num("recovery.batch_size", rc.batch_size, lo=1, optional=True)
    _num("recovery.layer_epochs", rc.layer_epochs, lo=0, optional=True)
    _num("recovery.ce_weight", rc.ce_weight, lo=0)
    _num("recovery.kd_weight", rc.kd_weight, lo=0)
    _num("recovery.kd_temperature", rc.kd_temperature, lo=0, lo_open=True)

    f = cfg.finetune
    _num("finetune.epochs", f.epochs, lo=0)
    _num("finetune.lr", f.lr, lo=0, lo_open=True)
    _choice("finetune.optimizer", f.optimizer, OPTIMIZERS)
    _choice("finetune.schedule", f.schedule, ("constant", "cosine"))
    _num("speed_check.require_speedup", cfg.speed_check.require_speedup, lo=0, lo_open=True, optional=True)
    return cfg


register_validator(RunConfig, validate_run_config)
