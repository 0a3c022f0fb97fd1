"""The conventional layer-by-layer pipeline (OSPR eq. 1), kept as a baseline for cost.

Cut one node, then recover by reconstructing the *next* node's output of the original network
(MSE on its feature map), move on to the next node. Every cut costs its own recovery, which is
what one-step recovery avoids.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from deploy_prune.config import RecoveryConfig
from deploy_prune.data import stage_loader
from deploy_prune.nodes import Node
from deploy_prune.recovery.losses import MSEMimic
from deploy_prune.recovery.mimic import classifier_modules, mimic_loss_fn
from deploy_prune.surgery import Plan, apply_plan
from deploy_prune.train import fit, make_optimizer, steps_for

log = logging.getLogger(__name__)


def next_node(nodes: list[Node], node: Node) -> Node:
    """The first node whose feature map comes after ``node``'s (or the last node)."""
    later = [n for n in nodes if n.order > node.order]
    return min(later, key=lambda n: n.order) if later else node


def layerwise(teacher: nn.Module, nodes: list[Node], plan: Plan, *, loader, cfg: RecoveryConfig,
              device: torch.device, example: torch.Tensor) -> tuple[nn.Module, dict]:
    """Cut ``plan`` node by node, reconstructing the next node after each cut."""
    teacher = teacher.to(device).eval()
    student = copy.deepcopy(teacher).cpu()
    todo = [n for n in nodes if n.name in plan]
    layer_epochs = cfg.epochs if cfg.layer_epochs is None else cfg.layer_epochs
    steps_each = steps_for(layer_epochs, loader)
    for i, node in enumerate(todo):
        apply_plan(student, {node.name: plan[node.name]}, example)
        target = next_node(nodes, node)
        student.to(device).train()
        for m in classifier_modules(student, teacher):
            for p in m.parameters():
                p.requires_grad_(not cfg.freeze_classifier)
        opt = make_optimizer(student.parameters(), name="adam", lr=cfg.lr)
        log.info("layerwise %d/%d: cut %s, reconstruct %s", i + 1, len(todo), node.name, target.name)
        fit(student, stage_loader(loader, f"layer{i}"), steps=steps_each, loss_fn=mimic_loss_fn(teacher, [target], MSEMimic()),
            optimizer=opt, device=device, desc=f"layer {i + 1}/{len(todo)}")
        student.cpu()
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval(), {"layers": len(todo), "epochs": layer_epochs * len(todo),
                            "steps": steps_each * len(todo)}
