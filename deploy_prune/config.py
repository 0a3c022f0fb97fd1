"""Dataclass configs with YAML overrides and dotted ``key=value`` command-line overrides.

Each stage's dataclass holds its defaults; a YAML file in ``configs/`` is a small override of
them. Unknown keys and wrong types are errors that name the key. YAML is read with a safe
loader (nothing in a config is ever evaluated) under resource limits: files over
``MAX_YAML_BYTES`` and documents with more than ``MAX_YAML_ALIASES`` alias references (an
"alias bomb" expands exponentially) are refused before anything is built from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


MAX_YAML_BYTES = 1 << 20  # 1 MiB: the largest committed config is a few KB
MAX_YAML_ALIASES = 1000  # alias references (*name) per document
MAX_YAML_NODES = 100_000  # nodes once every alias is expanded (9 levels of 9 aliases: 9^9)


class _LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts alias references and stops past the limit."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"more than {MAX_YAML_ALIASES} YAML alias references (*name); "
                                  "refusing a possible alias bomb")
        return super().compose_node(parent, index)


def safe_yaml(text: str, *, source: str = "YAML") -> Any:
    """Parse YAML text safely, within the size and alias limits; errors name ``source``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes is over the {MAX_YAML_BYTES}-byte limit for YAML")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int], stack: set[int]) -> int:
    """Nodes in ``node`` once aliases are expanded (shared nodes counted each time they are
    used, as anything walking the result would), refused past ``MAX_YAML_NODES``."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in stack:
        raise ConfigError("a recursive YAML alias; refusing it")
    stack.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, memo, stack) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, stack) + _expanded_size(v, memo, stack) for k, v in node.value)
    stack.discard(key)
    if size > MAX_YAML_NODES:
        raise ConfigError(f"the document expands to more than {MAX_YAML_NODES} nodes through its "
                          "aliases; refusing a possible alias bomb")
    memo[key] = size
    return size


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits | cifar10 | imagefolder
    root: str | None = None  # default: the dataset's usual local place
    download: bool = False  # torchvision download for machines with a network
    val_fraction: float = 0.1  # held out of the training split, deterministic by seed
    max_train_samples: int | None = None  # cap for quick runs
    max_eval_samples: int | None = None  # cap on validation and test images (None: all)
    batch_size: int = 128  # training batch of every stage unless the stage sets its own
    eval_batch_size: int = 512  # batch for accuracy evaluation
    num_workers: int = 0  # DataLoader worker processes (ImageFolder only)
    # evaluation preprocessing, the model's own (set by `import`, carried in the base plan's config)
    image_size: int | None = None  # side the model sees; None: the dataset's (28, 8, 32; ImageFolder 224)
    resize: int | None = None  # shorter side before the centre crop to image_size; None: image_size*256/224
    # for ImageFolder, a plain resize to image_size for the in-memory datasets; 0: plain resize (no crop)
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest (resize filter)
    mean: list[float] | None = None  # per channel; None: the dataset's (ImageNet's for ImageFolder)
    std: list[float] | None = None  # per channel; None: the dataset's (ImageNet's for ImageFolder)
    channels: int | None = None  # 1 or 3; None: the dataset's own (grayscale is repeated to 3)
    augment: bool = False  # training augmentation (flip + shift/crop); off: train on the eval transform


@dataclass
class ModelConfig:
    arch: str = "small_vgg"  # a name in deploy_prune.models.MODELS, tv.NAME for torchvision, timm.NAME for timm
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model builder
    weights: str | None = None  # local weights file (torchvision archs); never downloaded


@dataclass
class TrainConfig:
    epochs: int = 5  # baseline training epochs (0: use the model as built or loaded)
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD (Nesterov) momentum
    weight_decay: float = 5e-4  # L2 weight decay
    schedule: str = "cosine"  # cosine | step | constant
    step_size: int = 5  # schedule=step: epochs between lr drops
    gamma: float = 0.1  # schedule=step: lr factor at each drop
    label_smoothing: float = 0.0  # cross-entropy label smoothing


@dataclass
class RBPConfig:
    """Recursive Bayesian Pruning (METHOD.md section 7; docs/rbp.md lists what is reconstructed)."""

    prior_std: float = 0.1  # t of the sparsity prior N(0, t^2) in KL(N(mu, s^2) || N(0, t^2))
    init_log_sigma: float = -2.0  # log s at the start (mu starts at 1: the trained network)
    kl_weight: float = 1e-4  # weight of the KL (summed over the node's channels) beside the mean CE
    epochs_per_layer: float = 0.25  # noise-learning epochs per visited node (fractions allowed)
    probe_epochs: float = 0.25  # joint pass over all nodes first: crucial nodes + width forecast
    lr: float = 0.05  # Adam on (mu, log s)
    threshold: float | None = None  # |mu| below this is cut; None: solved for allocation.flops_reduction
    collapse: str = "mean"  # a decided node's noise -> mean (theta = mu) | one (theta = 1: the cut net)


@dataclass
class ScoringConfig:
    method: str = "beta"  # any name in deploy_prune.scoring.SCORERS
    l1_lambda: float = 1.0  # OSPR eq. 3 lambda (CIFAR-10: 1.0, ImageNet: 0.1)
    lr: float = 1e-5  # OSPR: 1e-5 (CIFAR-10), 1e-4 (ImageNet)
    epochs: float = 15  # OSPR: 15 (CIFAR-10), 10 (ImageNet); fractions allowed
    batch_size: int | None = None  # default: data.batch_size
    rbp: RBPConfig = field(default_factory=RBPConfig)


@dataclass
class CrucialConfig:
    n: int = 2  # N highest-scoring nodes are crucial (N >= 2); the last conv node always is
    nodes: list[str] | None = None  # explicit list instead of top-N (last conv node still added)
    # how the top-N are chosen: "score" (the N highest node scores, OSPR) | "per_stage" (at most
    # one per spatial resolution, so two neighbouring full-resolution nodes cannot take the
    # whole crucial set and force the FLOPs cut onto the rest; docs/results/peers.md)
    select: str = "score"
    # per_stage only: may the stem (the node of the first conv, which reads the image) be crucial?
    # false: never, while another node is left (its map is a linear filter of the pixels, and kept
    # whole it costs the next conv its full-resolution input; docs/results/peers.md)
    stem: bool = False
    # weigh what keeping a node whole costs (allocation.target=flops): the FLOPs its whole width
    # adds to the slim model the global ranking gives, beside the nodes already picked. per_stage
    # takes each chosen stage's cheapest of its best-scored nodes; a node with which the set could
    # no longer reach the target (at the rounding) is never taken. false: beta's score alone.
    # Crucial nodes are never narrowed, so a costly one forces the cut onto every other node
    # (docs/results/peers.md)
    cost: bool = True


@dataclass
class AllocationConfig:
    target: str = "flops"  # flops | channels | speedup | latency
    method: str = "global"  # global (ranked by score) | uniform (same ratio per prunable node)
    flops_reduction: float = 3.0  # 3.0 = 3x fewer FLOPs
    keep_fraction: float = 0.5  # target=channels: fraction of prunable channels kept
    tolerance: float = 0.03  # relative tolerance on the FLOPs target
    min_channels: int = 1  # per-node minimum kept channels
    min_fraction: float = 0.05  # per-node minimum kept fraction
    # kept counts rounded to a multiple; auto: the multiple the target hardware computes channels
    # in, measured (docs/results/rounding.md): 16 on AVX-512 CPUs, 8 on AVX2 CPUs and on GPUs
    # (tensor cores); plan.json's "rounding" says which and why; 1 = exact widths
    round_to: int | str = "auto"
    # per-node scaling of channel scores before the global ranking: mean = each node's scores
    # divided by their mean (scores whose scale follows the layer, e.g. L1 norms that grow with
    # fan-in, or |beta| under an L1 pull that differs per layer); none = as they are; auto = what
    # the scorer declares (mean for l1 and beta, none otherwise). Crucial nodes use the raw scores.
    normalize: str = "auto"
    # latency-aware allocation (target=speedup|latency)
    speedup: float = 2.0  # target=speedup: measured speedup to reach (2.0 = twice as fast)
    latency_ms: float | None = None  # target=latency: slim latency to reach, in ms
    backend: str = "ort"  # bench backend the latency table is measured on
    device: str = "cpu"  # device the latency table is measured on
    batch: int = 1  # batch size the latency table is measured at
    precision: str = "fp32"  # precision the latency table is measured in
    grid: int = 8  # points per node in the latency table


@dataclass
class RecoveryConfig:
    mode: str = "onestep"  # onestep | layerwise | ce | none
    loss: str = "kl"  # any name in deploy_prune.recovery.MIMIC_LOSSES
    nodes: list[str] | None = None  # mimic these instead of the crucial nodes
    epochs: float = 15  # one-step recovery epochs (OSPR: 15 on CIFAR-10); fractions allowed
    lr: float = 1e-3  # Adam learning rate of recovery
    step_size: int = 5  # epochs between lr drops
    gamma: float = 0.1  # lr factor at each drop
    batch_size: int | None = None  # default: data.batch_size
    freeze_classifier: bool = True  # keep the layers after the last conv node frozen (OSPR)
    # mode=layerwise: reconstruction epochs after each layer is cut; None = recovery.epochs, as
    # in the conventional pipeline where every cut gets its own full recovery
    layer_epochs: float | None = None
    # mode=onestep: extra terms beside the mimic loss (0 = OSPR's pure mimicking)
    ce_weight: float = 0.0  # + ce_weight * cross-entropy on the labels (the task loss)
    kd_weight: float = 0.0  # + kd_weight * T^2 * KL(teacher logits/T || student logits/T)
    kd_temperature: float = 4.0  # T of the logit distillation (kd_weight > 0)


@dataclass
class FinetuneConfig:
    epochs: float = 20  # cross-entropy fine-tuning epochs after recovery (0: none)
    lr: float = 1e-5  # fixed learning rate (OSPR: 1e-5)
    optimizer: str = "adam"  # adam | sgd
    # constant (OSPR: a fixed lr) | cosine (annealed to 0 over the fine-tuning steps, the
    # schedule of Torch-Pruning's fine-tuning; docs/results/peers.md ablation)
    schedule: str = "constant"


@dataclass
class SpeedCheckConfig:
    """The slowdown guard after prune and run (deploy_prune/speed.py)."""

    enabled: bool = True  # time slim vs base on allocation.backend/device/precision/batch (seconds)
    require_speedup: float | None = None  # below this measured speedup: an error (exit 2)


@dataclass
class RunConfig:
    seed: int = 0  # seeds splits, shuffles and initialisation; each stage derives its own from it
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    crucial: CrucialConfig = field(default_factory=CrucialConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    speed_check: SpeedCheckConfig = field(default_factory=SpeedCheckConfig)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[C], data: Any, *, prefix: str = "") -> C:
    """Build dataclass ``cls`` from a (partial) mapping; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["recovery.epochs=3", "data.name=digits"]`` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=1)")
        key, raw = item.split("=", 1)
        value = safe_yaml(raw, source=f"override {key.strip()}") if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes is over the {MAX_YAML_BYTES}-byte limit for a config file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    data = safe_yaml(text, source=str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    cls: type[C] = RunConfig,  # type: ignore[assignment]
) -> C:
    """Defaults <- YAML file <- dotted overrides, validated into ``cls``."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    cfg = from_dict(cls, data)
    for check in VALIDATORS.get(cls, ()):  # ranges and registry names, before any work starts
        check(cfg)
    return cfg


# Checks beyond types, per config class, run by load_config. deploy_prune.validate registers the
# RunConfig one (it needs the registries, which import this module: registering keeps config.py
# free of an import cycle).
VALIDATORS: dict[type, list[Callable[[Any], Any]]] = {}


def register_validator(cls: type, check: Callable[[Any], Any]) -> None:
    VALIDATORS.setdefault(cls, [])
    if check not in VALIDATORS[cls]:
        VALIDATORS[cls].append(check)
