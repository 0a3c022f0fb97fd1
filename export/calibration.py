"""Calibration inputs for INT8 engines, drawn from the dataset a model directory was made with.

The data config is the one recorded in the model's plan (``plan.info['config']``), so a slim
model is calibrated on the images it was trained and recovered on: the validation split,
which is deterministic and never the test split.

A model without a dataset (the paper-claims suite's random-weight ImageNet-shape models) can
still be *timed* as an INT8 engine: :func:`calibration_for` then returns seeded N(0, 1) images
and says so. The engine's latency does not depend on its quantisation scales, its accuracy
does, so such an engine is for timing only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from deploy_prune.artifacts import ModelPlan
from deploy_prune.config import ConfigError
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


RANDOM_SOURCE = "random"


def calibration_for(plan: ModelPlan, *, count: int = 8, batch_size: int = 32,
                    seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """INT8 calibration batches and their source: ``dataset:NAME`` when the plan records a
    dataset that loads here, else ``random`` (seeded N(0, 1) images: fine for timing, not for
    accuracy; the reason is logged)."""
    if "config" in plan.info:
        try:
            batches = calibration_batches(plan, count=count, batch_size=batch_size)
            return batches, f"dataset:{plan.info['config'].get('data', {}).get('name', '?')}"
        except (OSError, ValueError, ConfigError) as e:  # missing dataset, wrong shapes
            log.warning("INT8 calibration on random images (timing only): %s", e)
    else:
        log.info("INT8 calibration on random images (timing only): the plan records no dataset")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, *plan.example().shape[1:])
    return [torch.randn(shape, generator=gen) for _ in range(count)], RANDOM_SOURCE


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
