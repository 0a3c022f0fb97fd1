"""Training and evaluation loops shared by baseline training, scoring, recovery and fine-tuning."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from deploy_prune import distributed
from deploy_prune.artifacts import NonFiniteError
from deploy_prune.config import TrainConfig
from deploy_prune.data import epoch_batches
from deploy_prune.progress import progress

log = logging.getLogger(__name__)

# Test hook: called as ``stop_hook(desc, step)`` after every optimiser step (and its checkpoint);
# tests raise from it to interrupt a stage at a chosen step, as a kill would.
stop_hook: Callable[[str, int], None] | None = None


@dataclass
class StepState:
    """Optimiser state of a training stage, to checkpoint and resume it mid-way."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: int
    start: int = 0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def steps_for(epochs: float, loader) -> int:
    """Number of optimiser steps for a (possibly fractional) number of epochs."""
    return max(1, int(math.ceil(epochs * len(loader))))


def batches(loader: Iterable, steps: int, *, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start .. steps - 1`` of cycling ``loader`` (epoch ``e`` has its own shuffle).

    Step ``k`` is batch ``k % len(loader)`` of epoch ``k // len(loader)`` whatever ran before, so
    a stage resumed at step ``start`` sees exactly the batches an uninterrupted one would.
    """
    if len(loader) == 0:  # an empty loader would loop here for ever
        raise ValueError("the training split is empty (check data.max_train_samples, "
                         "data.val_fraction and the dataset)")
    per_epoch = len(loader)
    step = start
    while step < steps:
        epoch, offset = divmod(step, per_epoch)
        for xb, yb in epoch_batches(loader, epoch, start=offset):
            yield xb, yb
            step += 1
            if step >= steps:
                return


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``."""
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss = 0.0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)  # (B, K)
        loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        correct1 += (top[:, 0] == yb).sum().item()
        correct5 += (top == yb[:, None]).any(dim=1).sum().item()
        n += len(yb)
    model.train(was_training)
    if n == 0:  # 0% on no samples would be a wrong number, not a result
        raise ValueError("the evaluation split is empty (check data.max_eval_samples and the dataset)")
    return {"top1": 100.0 * correct1 / max(n, 1), "top5": 100.0 * correct5 / max(n, 1),
            "loss": loss / max(n, 1), "samples": n}


def make_optimizer(params, *, name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")


def make_scheduler(opt, *, name: str, total_steps: int, steps_per_epoch: int, step_size: int = 5,
                   gamma: float = 0.1):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if name == "step":  # step_size is in epochs, like the papers' schedules
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, step_size * steps_per_epoch), gamma=gamma)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {name!r}; expected cosine, step or constant")


def fit(
    model: nn.Module,
    loader: Iterable,
    *,
    steps: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    device: torch.device | str = "cpu",
    desc: str = "train",
    start_step: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Run ``steps`` optimiser steps of ``loss_fn(model, x, y)``; returns the last mean loss.

    Under torchrun the gradients are averaged over ranks (DDP, or by hand for parameters
    outside ``model``), so every rank takes the same step.
    """
    net, by_hand = distributed.wrap(model, optimizer)
    running, count = 0.0, 0
    it = batches(loader, steps, start=start_step)
    bar = progress(it, total=steps - start_step, desc=desc, leave=False)
    for i, (xb, yb) in enumerate(bar, start=start_step):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = loss_fn(net, xb, yb)
        value = loss.item()
        if distributed.any_rank(not math.isfinite(value)):  # every rank stops at the same step
            what = f"the loss became {value}" if not math.isfinite(value) else "another rank's loss went non-finite"
            raise NonFiniteError(f"{desc}: {what} at step {i + 1}/{steps}; stopped before anything "
                                 "was saved (lower the learning rate?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sync_grads(by_hand)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        running, count = running + value, count + 1
        if count % 20 == 0:
            bar.set_postfix(loss=f"{running / count:.4f}")
        if (i + 1) % FINITE_CHECK_EVERY == 0 or i + 1 == steps:
            check_finite_params(model, desc, i + 1, steps)
        if on_step is not None:
            on_step(i + 1)
        if stop_hook is not None:
            stop_hook(desc, i + 1)
    distributed.sync_buffers(model)
    check_finite_params(model, desc, steps, steps)
    return running / max(count, 1)


FINITE_CHECK_EVERY = 25  # steps between weight checks (the loss is checked every step)


def check_finite_params(model: nn.Module, desc: str, step: int, steps: int) -> None:
    """Stop with one line naming the stage and step when a weight or buffer went NaN/Inf."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{desc}: weights went NaN or infinite ({name}) at step "
                                     f"{step}/{steps}; stopped before anything was saved "
                                     "(lower the learning rate?)")


def cross_entropy(label_smoothing: float = 0.0):
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    return loss


def baseline_state(model: nn.Module, train_loader, cfg: TrainConfig) -> StepState:
    """Optimiser, schedule and step count of baseline training (what a checkpoint restores)."""
    steps = steps_for(cfg.epochs, train_loader)
    opt = make_optimizer(model.parameters(), name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, name=cfg.schedule, total_steps=steps, steps_per_epoch=len(train_loader),
                           step_size=cfg.step_size, gamma=cfg.gamma)
    return StepState(opt, sched, steps)


def train_baseline(model: nn.Module, train_loader, cfg: TrainConfig, *, device: torch.device,
                   state: StepState | None = None, on_step: Callable[[int], None] | None = None) -> float:
    """Train all weights with cross-entropy per ``cfg``; returns the last mean loss.

    ``state`` (from :func:`baseline_state`, possibly restored from a checkpoint) resumes at its
    ``start`` step; ``on_step(step)`` runs after each step (mid-stage checkpoints).
    """
    model.to(device).train()
    state = state or baseline_state(model, train_loader, cfg)
    log.info("training baseline: %d steps (%.2f epochs)", state.steps, cfg.epochs)
    return fit(model, train_loader, steps=state.steps, loss_fn=cross_entropy(cfg.label_smoothing),
               optimizer=state.optimizer, scheduler=state.scheduler, device=device, desc="train",
               start_step=state.start, on_step=on_step)
