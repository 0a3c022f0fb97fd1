"""The scorer interface and registry."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy_prune._registry import Registry
from deploy_prune.config import RunConfig
from deploy_prune.nodes import Node

Scores = dict[str, np.ndarray]  # node name -> (C,) channel scores


@dataclass
class ScoreContext:
    """What a scorer may use: the trained model, its nodes, data and the run config."""

    model: nn.Module
    nodes: list[Node]
    example: torch.Tensor  # (1, C, H, W)
    cfg: RunConfig = field(default_factory=RunConfig)
    train_loader: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    checkpoint: Any = None  # a path for mid-stage checkpoints (scorers that train), or None


class Scorer(abc.ABC):
    """Returns one score per channel of every node. Must not change the model's weights."""

    needs_data: bool = False

    @abc.abstractmethod
    def score(self, ctx: ScoreContext) -> Scores:
        """Channel scores, ``{node.name: array of shape (node.channels,)}``."""


SCORERS: Registry[type[Scorer]] = Registry("scorer")


def node_scores(scores: Scores) -> dict[str, float]:
    """Node score = mean channel score (OSPR eq. 4 prints a sum; the text says mean, and the
    mean lets wide and narrow layers compare)."""
    return {k: float(np.mean(v)) for k, v in scores.items()}
