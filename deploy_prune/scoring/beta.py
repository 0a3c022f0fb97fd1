"""Learned importance vector beta (OSPR eq. 2-4).

Every node gets beta_i in R^C, initialised to 1, multiplying its output channel-wise by
|beta_ij|. The network weights are frozen (eval mode, so BN statistics do not move either);
only the betas train, with Adam on

    loss = cross_entropy(model(x), y) + lambda * sum_i ||beta_i||_1        # OSPR eq. 3

Channel score = |beta_ij|. The gates are hooks: they never reach the pruned model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from deploy_prune.gates import ChannelGates, frozen
from deploy_prune.scoring._base import SCORERS, ScoreContext, Scorer, Scores
from deploy_prune.train import StepState, fit, steps_for

log = logging.getLogger(__name__)


class Betas(nn.Module):
    """One beta vector per node, initialised to 1."""

    def __init__(self, nodes, device) -> None:
        super().__init__()
        self.names = [n.name for n in nodes]
        self.values = nn.ParameterList(nn.Parameter(torch.ones(n.channels, device=device)) for n in nodes)
        self._index = {name: i for i, name in enumerate(self.names)}

    def gate(self, name: str) -> torch.Tensor:
        return self.values[self._index[name]].abs()  # OSPR eq. 2: output * |beta|

    def l1(self) -> torch.Tensor:
        return sum(v.abs().sum() for v in self.values)  # OSPR eq. 3 regulariser


@SCORERS.register("beta")
class BetaScorer(Scorer):
    """Train beta with frozen weights; score = |beta|."""

    needs_data = True
    # ranked relative to each node's mean (allocation.normalize=auto): raw |beta| does not compare
    # across nodes: on VGG-16 the L1 pull left an MLP head's units and the deep layers with small
    # betas, the global ranking cut them hardest, and the 2x models fell to 50-80% where the
    # per-node ranking gave 84-87% (docs/results/peers_vgg16.md); small VGG: the same or better
    normalize = "mean"

    def score(self, ctx: ScoreContext) -> Scores:
        if ctx.train_loader is None:
            raise ValueError("beta scoring needs training data")
        cfg = ctx.cfg  # the scoring section
        model = ctx.model.to(ctx.device)
        betas = Betas(ctx.nodes, ctx.device)
        loader = ctx.train_loader
        steps = steps_for(cfg.epochs, loader)
        opt = torch.optim.Adam(betas.parameters(), lr=cfg.lr)
        lam = cfg.l1_lambda

        def loss_fn(m, x, y):
            return nn.functional.cross_entropy(m(x), y) + lam * betas.l1()

        state, on_step = StepState(opt, None, steps), None
        if ctx.checkpoint is not None:  # resumable: the betas and Adam's state are all that train
            from deploy_prune.checkpoint import Checkpointer

            ck = Checkpointer(ctx.checkpoint, {"betas": betas}, state)
            ck.restore()
            on_step = ck.save
        log.info("beta scoring: %d nodes, %d steps, lambda=%g, lr=%g", len(ctx.nodes), steps, lam, cfg.lr)
        with frozen(model), ChannelGates(model, ctx.nodes, betas.gate):
            fit(model, loader, steps=steps, loss_fn=loss_fn, optimizer=opt, device=ctx.device, desc="score",
                start_step=state.start, on_step=on_step)
        return {name: v.detach().abs().cpu().double().numpy() for name, v in zip(betas.names, betas.values)}
