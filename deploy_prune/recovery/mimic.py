"""One-step recovery by mimicking the original's crucial feature maps (OSPR eq. 5-12).

The slim network starts from the original's kept weights; the classifier layers (after the last
conv node) are the original's and stay frozen; for every crucial node the slim model's map is
pulled towards the original's on the same batch, recovery loss = mean over nodes (eq. 8).
Then the whole slim model is fine-tuned with cross-entropy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deploy_prune import distributed
from deploy_prune.config import FinetuneConfig, RecoveryConfig
from deploy_prune.nodes import Node, last_node
from deploy_prune.recovery.capture import FeatureCapture
from deploy_prune.recovery.losses import MIMIC_LOSSES, MimicLoss
from deploy_prune.train import (
    StepState,
    cross_entropy,
    fit,
    make_optimizer,
    make_scheduler,
    steps_for,
)

log = logging.getLogger(__name__)


class RecoveryError(ValueError):
    """A recovery setting that cannot work (e.g. KL with one node)."""


def classifier_modules(model: nn.Module, teacher: nn.Module | None = None) -> list[nn.Module]:
    """The layers after the last conv node: linears and 1-d norms of the head. With ``teacher``
    (the uncut model), only those pruning left whole: layers of an MLP head whose hidden units
    were cut must train, frozen they could not adapt to the units they lost."""
    whole = None
    if teacher is not None:
        shapes = {n: tuple(m.weight.shape) for n, m in teacher.named_modules() if hasattr(m, "weight")}
        whole = {n for n, m in model.named_modules() if hasattr(m, "weight") and shapes.get(n) == tuple(m.weight.shape)}
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.BatchNorm1d)
            and (whole is None or n in whole)]


def check_mimic_set(loss: MimicLoss, names: list[str], nodes: list[Node]) -> None:
    """KL/JS need N >= 2 nodes including the last conv node (OSPR section 3)."""
    known = {n.name for n in nodes}
    bad = [n for n in names if n not in known]
    if bad:
        raise RecoveryError(f"mimic nodes {bad} are not nodes of this model")
    flat = [n.name for n in nodes if n.flat and n.name in names]
    if flat:
        raise RecoveryError(f"mimic nodes {flat} are hidden units of the classifier head (flat (B, F) "
                            "features, no feature map): mimic conv nodes")
    if loss.needs_crucial_set:
        last = last_node(nodes).name
        if len(names) < 2 or last not in names:
            raise RecoveryError(
                f"{type(loss).__name__} needs at least 2 mimicked nodes including the last conv "
                f"node {last!r}; got {names}. Use mse or lasso for a single node.")


def mimic_nodes(student: nn.Module, teacher_nodes: list[Node], names: list[str],
                student_nodes: list[Node]) -> list[Node]:
    """The named nodes, checked to have the same width in teacher and student."""
    t = {n.name: n for n in teacher_nodes}
    s = {n.name: n for n in student_nodes}
    out = []
    for name in names:
        if name not in s or s[name].channels != t[name].channels:
            raise RecoveryError(f"node {name!r} was narrowed by pruning and cannot be mimicked; "
                                "mimic only crucial (unpruned) nodes")
        out.append(t[name])
    return out


def mimic_loss_fn(teacher: nn.Module, nodes: list[Node], loss: MimicLoss, *, ce_weight: float = 0.0,
                  kd_weight: float = 0.0, kd_temperature: float = 4.0) -> Callable:
    """loss(student, x, y): mean over nodes of loss(teacher map, student map)  (OSPR eq. 8),
    plus ``ce_weight`` * cross-entropy on the labels and ``kd_weight`` * logit distillation
    (Hinton et al.: T^2 * KL(softmax(t/T) || softmax(s/T))) when those weights are non-zero."""
    teacher.eval()
    if ce_weight < 0 or kd_weight < 0 or kd_temperature <= 0:
        raise RecoveryError("recovery.ce_weight and recovery.kd_weight must be >= 0 and "
                            f"recovery.kd_temperature > 0; got {ce_weight}, {kd_weight}, {kd_temperature}")

    def fn(student, x, y):
        with torch.no_grad(), FeatureCapture(teacher, nodes) as tcap:
            t_logits = teacher(x)  # (B, K)
        with FeatureCapture(distributed.unwrap(student), nodes) as scap:
            s_logits = student(x)  # (B, K)
        terms = [loss(tcap.maps[n.name], scap.maps[n.name]) for n in nodes]
        total = torch.stack(terms).mean()
        if ce_weight:
            total = total + ce_weight * F.cross_entropy(s_logits, y)
        if kd_weight:
            t = kd_temperature
            kd = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                          reduction="batchmean")
            total = total + kd_weight * t * t * kd
        return total

    return fn


def recovery_state(student: nn.Module, loader, cfg: RecoveryConfig, teacher: nn.Module | None = None) -> StepState:
    if cfg.freeze_classifier:
        for m in classifier_modules(student, teacher):
            for p in m.parameters():
                p.requires_grad_(False)
    steps = steps_for(cfg.epochs, loader)
    opt = make_optimizer(student.parameters(), name="adam", lr=cfg.lr)
    sched = make_scheduler(opt, name="step", total_steps=steps, steps_per_epoch=len(loader),
                           step_size=cfg.step_size, gamma=cfg.gamma)
    return StepState(opt, sched, steps)


def finetune_state(student: nn.Module, loader, cfg: FinetuneConfig) -> StepState:
    for p in student.parameters():
        p.requires_grad_(True)
    steps = steps_for(cfg.epochs, loader)
    opt = make_optimizer(student.parameters(), name=cfg.optimizer, lr=cfg.lr)
    sched = (make_scheduler(opt, name="cosine", total_steps=steps, steps_per_epoch=len(loader))
             if cfg.schedule == "cosine" else None)
    return StepState(opt, sched, steps)


def recover(teacher: nn.Module, student: nn.Module, *, teacher_nodes: list[Node], student_nodes: list[Node],
            names: list[str], loader, cfg: RecoveryConfig, device: torch.device,
            state: StepState | None = None, on_step: Callable[[int], None] | None = None) -> float:
    """Train ``student`` to mimic ``teacher`` on ``names`` (``cfg.mode='ce'``: cross-entropy)."""
    teacher.to(device).eval()
    student.to(device).train()
    state = state or recovery_state(student, loader, cfg, teacher)
    if cfg.mode == "ce":  # "Model_CE": same budget, cross-entropy only
        loss_fn = cross_entropy()
    else:
        loss = MIMIC_LOSSES.get(cfg.loss)()
        check_mimic_set(loss, names, teacher_nodes)
        loss_fn = mimic_loss_fn(teacher, mimic_nodes(student, teacher_nodes, names, student_nodes), loss,
                                ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight,
                                kd_temperature=cfg.kd_temperature)
    log.info("recovery (%s, %s) on %s: %d steps", cfg.mode, cfg.loss, names, state.steps)
    return fit(student, loader, steps=state.steps, loss_fn=loss_fn, optimizer=state.optimizer,
               scheduler=state.scheduler, device=device, desc=f"recover[{cfg.loss}]",
               start_step=state.start, on_step=on_step)


def finetune(student: nn.Module, *, loader, cfg: FinetuneConfig, device: torch.device,
             state: StepState | None = None, on_step: Callable[[int], None] | None = None) -> float:
    """Cross-entropy fine-tuning of the whole slim model at a fixed lr (OSPR: 1e-5)."""
    student.to(device).train()
    state = state or finetune_state(student, loader, cfg)
    log.info("fine-tuning: %d steps at lr %g", state.steps, cfg.lr)
    return fit(student, loader, steps=state.steps, loss_fn=cross_entropy(), optimizer=state.optimizer,
               scheduler=state.scheduler, device=device, desc="finetune", start_step=state.start,
               on_step=on_step)
