"""Calibration inputs for INT8 engines, drawn from the dataset a model directory was made with.

The data config is the one recorded in the model's plan (``plan.info['config']``), so a slim
model is calibrated on the images it was trained and recovered on: the validation split,
which is deterministic and never the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from deploy_prune.artifacts import ModelPlan
from deploy_prune.data import load_data
from deploy_prune.pipeline import resolve_config

log = logging.getLogger(__name__)


def calibration_batches(plan: ModelPlan, *, count: int = 16, batch_size: int = 32) -> list[torch.Tensor]:
    """Up to ``count`` batches of ``batch_size`` validation images, (B, C, H, W) float32 each."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"calibration needs count >= 1 and batch_size >= 1, got {count}, {batch_size}")
    cfg = resolve_config(plan, None, [])
    data = load_data(cfg.data, seed=cfg.seed)
    shape = tuple(plan.example().shape[1:])
    batches = rebatch((x for x, _ in data.val), batch_size=batch_size, count=count, shape=shape)
    log.info("INT8 calibration: %d batches of %d %s images", len(batches), batch_size, data.name)
    return batches


def rebatch(xs: Iterable[torch.Tensor], *, batch_size: int, count: int,
            shape: Sequence[int]) -> list[torch.Tensor]:
    """Regroup a stream of (b, C, H, W) batches into ``count`` full batches of ``batch_size``."""
    need = batch_size * count
    taken: list[torch.Tensor] = []
    have = 0
    for x in xs:
        if tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"calibration images are {tuple(x.shape[1:])}, the model takes {tuple(shape)}")
        taken.append(x.float())
        have += x.shape[0]
        if have >= need:
            break
    if have < batch_size:
        raise ValueError(f"calibration needs at least {batch_size} images, the dataset gave {have}")
    flat = torch.cat(taken)[: min(have, need) // batch_size * batch_size]  # (N, C, H, W)
    return list(flat.split(batch_size))
