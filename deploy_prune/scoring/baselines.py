"""The paper's baseline selectors (OSPR Fig. 5b): random, first-k and filter L1 norm."""

from __future__ import annotations

import numpy as np

from deploy_prune.scoring._base import SCORERS, ScoreContext, Scorer, Scores


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Uniform random scores, seeded: a random selection of channels."""

    def score(self, ctx: ScoreContext) -> Scores:
        rng = np.random.default_rng(ctx.seed)
        return {n.name: rng.random(n.channels) for n in ctx.nodes}


@SCORERS.register("first_k")
class FirstKScorer(Scorer):
    """Keeps the first k channels of each node."""

    def score(self, ctx: ScoreContext) -> Scores:
        return {n.name: np.linspace(1.0, 0.0, n.channels, endpoint=False) for n in ctx.nodes}


@SCORERS.register("l1")
class L1Scorer(Scorer):
    """L1 norm of each output filter ("max response"); summed over coupled producers.

    Raw norms grow with fan-in (C_in * k * k weights of a similar scale), so they rank channels
    within a node, and their node means rank nodes (crucial selection); for the *global*
    ranking the allocation divides each node's scores by their mean (``allocation.normalize``:
    auto = mean for this scorer, as Torch-Pruning's default importance normaliser does)."""

    normalize = "mean"

    def score(self, ctx: ScoreContext) -> Scores:
        modules = dict(ctx.model.named_modules())
        out = {}
        for n in ctx.nodes:
            total = np.zeros(n.channels)
            for i, p in enumerate(n.producers):
                w = modules[p].weight.detach().abs().float().cpu()  # (C_out, C_in/g, k, k)
                per = w.flatten(1).sum(1).numpy()
                if n.maps:  # outputs mapped onto the node's channels (concat/split producers)
                    idx = np.asarray(n.maps[i])
                    np.add.at(total, idx[idx >= 0], per[idx >= 0])
                else:
                    total += per
            out[n.name] = total
        return out
