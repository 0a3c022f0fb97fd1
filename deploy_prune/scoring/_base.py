"""The scorer interface and registry."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deploy_prune._registry import Registry
from deploy_prune.config import RunConfig, ScoringConfig
from deploy_prune.decisions import Decision, Goal, Scores, node_scores
from deploy_prune.nodes import Node

__all__ = ["SCORERS", "Decision", "Goal", "ScoreContext", "Scorer", "Scores", "node_scores"]


@dataclass
class ScoreContext:
    """What a scorer may use: the trained model, its nodes, data, and its own config section.

    ``cfg`` is the scorer's own sub-config (:meth:`Scorer.config_of`), never the whole run
    config; ``goal`` carries the run's target and crucial-node rule for a scorer that decides
    widths itself (RBP). ``train_loader`` is already batched by ``scoring.batch_size``.
    """

    model: nn.Module
    nodes: list[Node]
    example: torch.Tensor  # (1, C, H, W)
    cfg: Any = field(default_factory=ScoringConfig)
    train_loader: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    goal: Goal = field(default_factory=Goal)
    checkpoint: Any = None  # a path for mid-stage checkpoints (scorers that train), or None


class Scorer(abc.ABC):
    """Returns one score per channel of every node. Must not change the model's weights.

    A scorer that also decides the widths (RBP) leaves its :class:`Decision` in
    :attr:`decision`; the prune then takes those widths instead of the global allocation's.
    """

    needs_data: bool = False
    decision: Decision | None = None
    # how allocation.normalize=auto treats these scores in the global ranking: "none" when they
    # compare across nodes as they are (beta, RBP), "mean" when their scale is per layer (L1 norms)
    normalize: str = "none"

    @classmethod
    def config_of(cls, cfg: RunConfig) -> Any:
        """The part of the run config this scorer reads (default: the ``scoring`` section)."""
        return cfg.scoring

    @abc.abstractmethod
    def score(self, ctx: ScoreContext) -> Scores:
        """Channel scores, ``{node.name: array of shape (node.channels,)}``."""


SCORERS: Registry[type[Scorer]] = Registry("scorer")
