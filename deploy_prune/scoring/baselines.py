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
    """L1 norm of each output filter ("max response"); summed over coupled producers, then
    divided by the node's mean (Torch-Pruning's default ``normalizer="mean"``).

    The division changes no choice inside a node; it makes the *global* ranking compare channels
    relative to their layer. Raw filter norms grow with fan-in (C_in * k * k weights of a similar
    scale), so a raw global ranking strips the layers with few inputs first: on ResNet-50 at 2x
    fewer FLOPs it cut layer1-2 to 16 channels and left layer3-4 whole, the layers where time per
    FLOP is highest at batch 1 (1.51x measured, against 1.77x with equal fractions per layer)."""

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
            mean = float(total.mean())
            out[n.name] = total / mean if mean > 0 else total
        return out
