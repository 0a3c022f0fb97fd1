"""The Python API: prune, recover, save and load any ``nn.Module`` classifier from your own code.

In the style of Torch-Pruning::

    import deploy_prune as dp

    slim, plan = dp.prune(model, torch.zeros(1, 3, 32, 32), loader=train_loader, target_flops=3.0)
    dp.recover(slim, model, train_loader, plan=plan, epochs=2)
    dp.save(slim, plan, "runs/slim")
    slim2, plan2 = dp.load("runs/slim", model=MyNet())  # your constructor rebuilds the architecture

``loader`` is any iterable of ``(x (B, C, H, W), y (B,))`` batches (a ``DataLoader``).

How a pruned model is rebuilt: a plan is data (architecture name + kept channel indices per
node), never a pickled module. For a registered architecture (``small_vgg``, ``resnet20``,
``tv.resnet18``, ...; pass ``arch=``) the plan rebuilds on its own, so the CLI stages (export,
bench) work on the saved directory. For your own class the plan records its qualified name
(``custom:mypkg.MyNet``) and :func:`load` needs a freshly built instance of it (``model=MyNet()``):
it is cut with the plan and loaded with the saved weights. Nothing is imported or executed from a
plan. Inputs must be square, ``(B, C, S, S)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from deploy_prune.artifacts import (
    ArtifactError,
    ModelPlan,
    _check_state,
    load_model_dir,
    read_plan,
    save_model_dir,
)
from deploy_prune.config import RunConfig, from_dict, merge, parse_overrides, to_dict

log = logging.getLogger(__name__)
CUSTOM = "custom:"


def _config(config: dict[str, Any] | list[str] | None, **sections: dict[str, Any]) -> RunConfig:
    """Defaults <- the explicit keyword settings <- ``config`` (a nested dict or ``key=value`` list)."""
    data: dict[str, Any] = {k: v for k, v in sections.items() if v}
    over = parse_overrides(config) if isinstance(config, list) else (config or {})
    return from_dict(RunConfig, merge(data, over))


def _base_plan(model: nn.Module, example_inputs: torch.Tensor, arch: str | None,
               arch_kwargs: dict[str, Any] | None) -> ModelPlan:
    if example_inputs.ndim != 4 or example_inputs.shape[2] != example_inputs.shape[3]:
        raise ValueError(f"example_inputs: expected a square (B, C, S, S) batch, got {tuple(example_inputs.shape)}")
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(example_inputs[:1].cpu())
    model.train(was)
    if logits.ndim != 2:
        raise ValueError(f"the model must return (B, num_classes) logits; it returned {tuple(logits.shape)}")
    name = arch or f"{CUSTOM}{type(model).__module__}.{type(model).__qualname__}"
    return ModelPlan(arch=name, arch_kwargs=dict(arch_kwargs or {}), num_classes=int(logits.shape[1]),
                     in_channels=int(example_inputs.shape[1]), input_size=int(example_inputs.shape[2]))


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    loader: Iterable | None = None,
    target_flops: float | None = 3.0,
    keep_fraction: float | None = None,
    scorer: str | None = None,
    crucial: list[str] | None = None,
    round_to: int | str = "auto",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    config: dict[str, Any] | list[str] | None = None,
    device: str | torch.device = "cpu",
    speed_check: bool = True,
) -> tuple[nn.Module, ModelPlan]:
    """Score ``model``'s channels, pick crucial nodes, allocate globally and cut the channels out.

    Args:
        model: a trained classifier returning ``(B, num_classes)`` logits; left untouched
            (returned on the CPU, in eval mode).
        example_inputs: one input batch, ``(B, C, S, S)``; fixes the traced graph and the FLOPs.
        loader: training batches ``(x, y)``; needed by data-driven scorers (``beta``, ``rbp``).
        target_flops: prune to this many times fewer FLOPs (3.0 = a third of the FLOPs).
        keep_fraction: instead, keep this fraction of the prunable channels.
        scorer: a name in ``deploy_prune.scoring.SCORERS``; default ``beta`` with a loader, else ``l1``.
        crucial: node names never narrowed (and mimicked by :func:`recover`); default: top-2 by score.
        round_to: round kept widths to a multiple; ``auto`` (default): the channel block of the
            hardware in ``config``'s ``allocation.device`` (16 on AVX-512 CPUs, 8 on AVX2 and GPUs); 1 = exact.
        arch, arch_kwargs: the registered architecture name of ``model``, when it is one, so the
            saved plan rebuilds without your constructor.
        config: further settings as a nested dict (``{"scoring": {"epochs": 1}}``) or dotted
            ``key=value`` strings, as in the YAML configs. They are recorded in the plan; give the
            ``data`` section (``{"data": {"name": "imagefolder", "root": DIR, "image_size": 32}}``)
            when CLI stages (``bench --accuracy``, ``recover``) should evaluate the saved model on
            your data with its preprocessing (the default is the built-in Fashion-MNIST).
        device: where scoring runs.
        speed_check: time the slim model against ``model`` (a few seconds; ONNX Runtime CPU, batch 1
            unless ``config`` sets ``allocation.backend/device/batch``), log the measured speedup
            beside the FLOPs reduction, warn loudly when it is not faster, and record it in
            ``plan.info["speed_check"]``; ``config={"speed_check": {"require_speedup": 1.5}}``
            raises :class:`~deploy_prune.speed.SlowerThanRequired` below that.

    Returns:
        ``(slim, plan)``: the smaller ``nn.Module`` and its :class:`~deploy_prune.artifacts.ModelPlan`
        (kept channels per node, crucial nodes, FLOPs and params before and after).
    """
    from deploy_prune import pipeline

    if target_flops is None and keep_fraction is None:
        raise ValueError("give target_flops or keep_fraction")
    alloc: dict[str, Any] = {"round_to": round_to}
    if keep_fraction is not None:
        alloc.update(target="channels", keep_fraction=keep_fraction)
    else:
        alloc.update(target="flops", flops_reduction=target_flops)
    cfg = _config(config, allocation=alloc, crucial={"nodes": crucial} if crucial else {})
    method = scorer or (cfg.scoring.method if loader is not None else "l1")
    base = _base_plan(model, example_inputs, arch, arch_kwargs)
    data = SimpleNamespace(train=loader) if loader is not None else None
    result = pipeline.score(model, base, cfg, data, torch.device(device), method=method)
    scores, decision = pipeline.scored(result, base, source=f"scorer {method}")
    res = pipeline.prune(model, base, cfg, scores, decision=decision, scorer=method)
    res.plan.info["scorer"] = method
    if speed_check:
        from deploy_prune import speed

        check = speed.speed_check(model, base, res.slim, res.plan, cfg)
        if check is not None:
            res.plan.info["speed_check"] = check
            log.info(speed.summary_line(check))
        speed.enforce(check, cfg, where="the pruned model was not returned")
    return res.slim, res.plan


def recover(
    slim: nn.Module,
    base: nn.Module,
    loader: Iterable,
    *,
    plan: ModelPlan,
    epochs: float = 1.0,
    loss: str = "kl",
    lr: float = 1e-3,
    nodes: list[str] | None = None,
    finetune_epochs: float = 0.0,
    finetune_lr: float = 1e-5,
    config: dict[str, Any] | list[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """One-step recovery: train ``slim`` to mimic ``base``'s crucial feature maps, in place.

    Args:
        slim, plan: what :func:`prune` returned (``plan`` names the crucial nodes and the shapes).
        base: the unpruned model it was cut from (the teacher; not changed).
        loader: training batches ``(x, y)``; the labels are used only by fine-tuning.
        epochs, loss, lr: recovery length (fractions allowed), mimic loss (``kl``, ``js``, ``mse``,
            ...: ``deploy_prune.recovery.MIMIC_LOSSES``) and Adam learning rate.
        nodes: mimic these nodes instead of the plan's crucial nodes.
        finetune_epochs, finetune_lr: cross-entropy fine-tuning afterwards (0: none).
        config: further ``recovery.*``/``finetune.*`` settings (dict or ``key=value`` strings).

    Returns:
        ``slim``, recovered, on the CPU in eval mode.
    """
    from deploy_prune.recovery.mimic import finetune
    from deploy_prune.run import recover_slim

    cfg = _config(config, recovery={"epochs": epochs, "loss": loss, "lr": lr, "nodes": nodes},
                  finetune={"epochs": finetune_epochs, "lr": finetune_lr})
    dev = torch.device(device)
    slim, info = recover_slim(base, slim, plan, cfg, loader, dev)
    if cfg.finetune.epochs > 0:
        finetune(slim, loader=loader, cfg=cfg.finetune, device=dev)
    base.cpu()
    plan.info["recovery"] = {**info, "finetune_epochs": cfg.finetune.epochs}
    plan.info.setdefault("config", to_dict(cfg))
    return slim.cpu().eval()


def save(model: nn.Module, plan: ModelPlan, path: str | Path, *, force: bool = False) -> Path:
    """Write ``path/plan.json`` and ``path/model.safetensors`` (atomically; no pickles)."""
    return save_model_dir(model, plan, path, force=force)


def load(path: str | Path, *, model: nn.Module | Callable[[], nn.Module] | None = None) -> tuple[nn.Module, ModelPlan]:
    """Rebuild the model saved in ``path``; returns ``(model, plan)`` (CPU, eval mode).

    Args:
        model: for your own architecture, a freshly built *unpruned* instance (or a zero-argument
            constructor); it is cut with the plan in place and loaded with the saved weights.
            Not needed for registered architectures.
    """
    from safetensors.torch import load_file

    from deploy_prune.artifacts import WEIGHTS_FILE
    from deploy_prune.surgery import apply_plan

    plan = read_plan(path)
    if model is None:
        if plan.arch.startswith(CUSTOM):
            raise ArtifactError(f"{path}: holds your own architecture {plan.arch[len(CUSTOM):]}; pass a fresh "
                                "instance: deploy_prune.load(path, model=YourModel(...))")
        return load_model_dir(path)
    net = model if isinstance(model, nn.Module) else model()
    name = f"{CUSTOM}{type(net).__module__}.{type(net).__qualname__}"
    if plan.arch.startswith(CUSTOM) and plan.arch != name:
        raise ArtifactError(f"{path}: saved from {plan.arch[len(CUSTOM):]}, but model is a {name[len(CUSTOM):]}")
    if plan.kept:
        apply_plan(net, plan.kept, plan.example())
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    _check_state(net, state, Path(path) / WEIGHTS_FILE)
    net.load_state_dict(state, strict=True)
    return net.eval(), plan


def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and sample count on ``loader``."""
    from deploy_prune.train import evaluate as _evaluate

    metrics = _evaluate(model.to(device), loader, torch.device(device))
    model.cpu()
    return metrics
