"""Recursive Bayesian Pruning (RBP), reconstructed from the paper's abstract (METHOD.md section 7).

Only the abstract is public here; ``docs/rbp.md`` says what comes from it and what is this
project's own reconstruction. In short:

* every visited node l gets a channel-wise multiplicative Gaussian noise
  ``theta_l = mu_l + sigma_l * eps``, ``eps ~ N(0, 1)`` (reparameterised), multiplied into the
  node's channels by :class:`~deploy_prune.gates.ChannelGates`; the weights stay frozen;
* nodes are visited once each, input to output (execution order). When node l is learned every
  earlier visited node is decided: its noise collapsed to a point (its mean) and its channels
  with ``|mu|`` below the threshold zeroed, which is the same as cut. So theta_l's posterior is
  conditioned on the earlier outcome: the Markov chain of the abstract;
* node l's objective is the cross-entropy under sampled noise plus
  ``kl_weight * sum_c KL(N(mu_c, s_c^2) || N(0, t^2))``, a narrow zero-mean Gaussian prior;
* channels with ``|mu|`` below the threshold are cut before the next node is learned. The
  threshold is given (``scoring.rbp.threshold``) or solved node by node for the FLOPs target
  ``allocation.flops_reduction`` (:func:`solve_cut`).

RBP decides the widths itself, so it returns them as data: ``RBPScorer.decision`` (crucial
nodes and kept counts, written into scores.json), which the prune takes in place of the global
allocation. The scores are the learned ``|mu|`` (:func:`mu_scores`), and the highest ``|mu|``
fill each decided width, which are exactly the channels RBP kept. ``RBPScorer.result`` keeps the
visit order and every per-node record.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deploy_prune.config import RBPConfig, RunConfig
from deploy_prune.data import stage_loader
from deploy_prune.decisions import Decision, Goal, floor_width, round_width, select_crucial
from deploy_prune.flops import count
from deploy_prune.gates import ChannelGates, frozen
from deploy_prune.nodes import Node
from deploy_prune.progress import progress
from deploy_prune.scoring._base import SCORERS, ScoreContext, Scorer, Scores
from deploy_prune.surgery import Plan, apply_plan
from deploy_prune.train import fit, steps_for

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The variational noise and its objective (METHOD.md section 7).


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Elementwise ``KL(N(mu, s^2) || N(0, t^2)) = log(t/s) + (s^2 + mu^2) / (2 t^2) - 1/2``.

    The closed form of METHOD.md section 7, with ``s = exp(log_sigma)`` and ``t = prior_std``.
    """
    t2 = prior_std**2
    return math.log(prior_std) - log_sigma + (torch.exp(2 * log_sigma) + mu**2) / (2 * t2) - 0.5


class ChannelNoise(nn.Module):
    """Multiplicative noise ``theta = mu + sigma * eps``, ``eps ~ N(0, 1)``, one per channel.

    ``mu`` starts at 1 (the trained network unchanged) and ``log sigma`` at ``init_log_sigma``.
    ``theta`` is the current draw that the gates multiply in; :meth:`resample` renews it.
    """

    def __init__(self, channels: int, *, init_log_sigma: float, device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.ones(channels, device=device))  # (C,)
        self.log_sigma = nn.Parameter(torch.full((channels,), float(init_log_sigma), device=device))  # (C,)
        self.generator = generator
        self.theta = self.mu.detach()  # (C,)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()  # (C,)

    def sample(self, n: int | None = None) -> torch.Tensor:
        """Reparameterised draws of theta: (C,), or (n, C) for ``n`` draws."""
        shape = (self.mu.shape[0],) if n is None else (n, self.mu.shape[0])
        eps = torch.randn(shape, generator=self.generator, device=self.mu.device)
        return self.mu + self.sigma * eps

    def resample(self) -> torch.Tensor:
        """A new draw, shared by every gate of the node until the next one (one per batch)."""
        self.theta = self.sample()
        return self.theta

    def kl(self, prior_std: float) -> torch.Tensor:
        """Summed KL to the prior N(0, prior_std^2): a scalar."""
        return gaussian_kl(self.mu, self.log_sigma, prior_std).sum()


class _GateField:
    """Gate values for ChannelGates: a fixed point for decided nodes, the current draw for noisy ones."""

    def __init__(self, fixed: Mapping[str, torch.Tensor], noisy: Mapping[str, ChannelNoise]) -> None:
        self.fixed, self.noisy = fixed, noisy

    def factor(self, name: str) -> torch.Tensor:
        return self.noisy[name].theta if name in self.noisy else self.fixed[name]

    def active(self, nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if n.name in self.noisy or n.name in self.fixed]


def learn_noise(model: nn.Module, nodes: list[Node], noisy: Mapping[str, ChannelNoise],
                fixed: Mapping[str, torch.Tensor], loader, *, cfg: RBPConfig, epochs: float,
                device: torch.device, desc: str = "rbp") -> float:
    """Fit the noisy nodes' (mu, log sigma), weights frozen and decided nodes at their points.

    ``loss = cross_entropy(f(x; theta), y) + kl_weight * sum_c KL(N(mu_c, s_c^2) || N(0, t^2))``
    (METHOD.md section 7). Returns the last mean loss.
    """
    gates = _GateField(fixed, noisy)
    params = [p for z in noisy.values() for p in z.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for z in noisy.values():
            z.resample()
        kl = sum(z.kl(cfg.prior_std) for z in noisy.values())
        return nn.functional.cross_entropy(m(x), y) + cfg.kl_weight * kl

    loader = stage_loader(loader, desc)  # each node's pass has its own shuffles
    with frozen(model), ChannelGates(model, gates.active(nodes), gates.factor):
        return fit(model, loader, steps=steps_for(epochs, loader), loss_fn=loss_fn, optimizer=opt,
                   device=device, desc=desc)


def collapse(mu: torch.Tensor, kept: np.ndarray, *, how: str = "mean") -> torch.Tensor:
    """The point a decided node's noise collapses to: ``mu`` (or 1) on kept channels, 0 on cut ones."""
    mask = torch.zeros_like(mu)  # (C,)
    mask[torch.as_tensor(kept, dtype=torch.long, device=mu.device)] = 1.0
    point = mu.detach() if how == "mean" else torch.ones_like(mu)
    return point * mask


# ---------------------------------------------------------------------------------------------
# Cutting rules: the allocation's guard rails, FLOPs on the real cut model, the threshold solver.


@dataclass(frozen=True)
class Limits:
    """Per-node guard rails of the global allocation (METHOD.md section 3), applied by RBP too:
    the floor and rounding of :mod:`deploy_prune.decisions`."""

    min_channels: int = 1
    min_fraction: float = 0.05
    round_to: int = 1

    @classmethod
    def of(cls, goal: Goal) -> Limits:
        return cls(min_channels=goal.min_channels, min_fraction=goal.min_fraction, round_to=goal.round_to)

    def kept(self, channels: int, n_cut: int) -> int:
        """Channels left after cutting ``n_cut``: at least the minimum, rounded to ``round_to``."""
        kept = max(channels - n_cut, floor_width(channels, self.min_channels, self.min_fraction))
        return round_width(kept, channels, self.round_to)


class FlopsOracle:
    """FLOPs reduction of the base model cut to given node widths, counted on the real cut model
    (as the allocation counts it), cached by widths. Works on its own CPU copy of the model."""

    def __init__(self, model: nn.Module, nodes: list[Node], example: torch.Tensor) -> None:
        self.model = copy.deepcopy(model).cpu().eval()
        for p in self.model.parameters():
            p.requires_grad_(True)  # torch-pruning traces the dependencies through autograd
        self.example = example[:1].cpu()  # (1, C, H, W)
        self.channels = {n.name: n.channels for n in nodes}
        self.nodes = nodes
        self.base = count(self.model, self.example).flops
        self._cache: dict[tuple, float] = {}

    def reduction(self, widths: Mapping[str, int]) -> float:
        """``base FLOPs / FLOPs`` with each named node cut to ``widths[node]`` channels."""
        key = tuple(sorted((k, int(v)) for k, v in widths.items() if v < self.channels[k]))
        if key not in self._cache:
            plan = {name: list(range(k)) for name, k in key}  # FLOPs depend on the counts only
            slim = apply_plan(copy.deepcopy(self.model), plan, self.example, nodes=self.nodes)
            self._cache[key] = self.base / max(count(slim, self.example).flops, 1)
        return self._cache[key]


def smallest_meeting(red: Callable[[int], float], total: int, target: float) -> int:
    """Smallest ``i`` in [0, total] with ``red(i) >= target``, or ``i - 1`` when that is closer to
    the target (the rule of ``allocation._search``); ``total`` when the target is out of reach."""
    if red(total) < target:
        return total
    lo, hi = 0, total
    while lo < hi:  # red is non-decreasing in i
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if red(mid) >= target else (mid + 1, hi)
    if lo > 0 and abs(red(lo - 1) - target) < abs(red(lo) - target):
        lo -= 1
    return lo


def solve_cut(node: Node, mu_abs: np.ndarray, forecasts: list[tuple[Node, np.ndarray]],
              widths: Mapping[str, int], *, oracle: FlopsOracle, limits: Limits,
              target: float) -> tuple[int, float, float]:
    """Channels of ``node`` to cut for the FLOPs target: (number cut, threshold, predicted reduction).

    Receding horizon: one threshold T is solved so that the network with the decided nodes at
    ``widths``, ``node`` cut at T by its learned ``mu_abs`` and every later node cut at T by its
    forecast (from the probe) meets ``target``; only ``node``'s cut is committed, and T is solved
    again at the next node with what it learned. At the last node no forecast is left, so the
    target is met as exactly as one channel allows. The caller puts values on one scale
    (:func:`relative`).
    """
    groups = [(node, mu_abs), *forecasts]
    owner = np.concatenate([np.full(len(a), i) for i, (_, a) in enumerate(groups)])
    values = np.concatenate([a for _, a in groups])
    order = np.argsort(values, kind="stable")  # channels by ascending |mu|: T sweeps up this list

    def widths_at(i: int) -> dict[str, int]:
        removed = np.bincount(owner[order[:i]], minlength=len(groups))
        return {**widths, **{n.name: limits.kept(n.channels, int(r)) for (n, _), r in zip(groups, removed)}}

    i = smallest_meeting(lambda k: oracle.reduction(widths_at(k)), len(values), target)
    threshold = float(values[order[i]]) if i < len(values) else math.inf
    return node.channels - widths_at(i)[node.name], threshold, oracle.reduction(widths_at(i))


def threshold_cut(node: Node, mu_abs: np.ndarray, threshold: float, *, limits: Limits) -> int:
    """Channels of ``node`` cut by a given threshold: |mu| < threshold, within the guard rails."""
    return node.channels - limits.kept(node.channels, int((mu_abs < threshold).sum()))


def relative(mu_abs: np.ndarray) -> np.ndarray:
    """|mu| over the node's mean |mu|: the scale on which one threshold is solved for all nodes."""
    return mu_abs / max(float(np.mean(mu_abs)), 1e-12)


def kept_indices(mu_abs: np.ndarray, n_cut: int) -> np.ndarray:
    """The ``C - n_cut`` channels with the largest |mu| (ties: lower index), sorted."""
    return np.sort(np.argsort(-mu_abs, kind="stable")[: len(mu_abs) - n_cut])


# ---------------------------------------------------------------------------------------------
# The scores RBP returns beside its decision.


def mu_scores(nodes: list[Node], records: Mapping[str, NodeRecord],
              probe: Mapping[str, np.ndarray] | None) -> Scores:
    """``|mu|`` per channel: learned at each visited node, from the joint probe elsewhere (ones
    when there was no probe). At a visited node the kept channels are its highest ``|mu|``
    (:func:`kept_indices`), so these scores fill the decided widths with exactly those channels."""
    out: Scores = {}
    for n in nodes:
        if n.name in records:
            out[n.name] = np.abs(records[n.name].mu).astype(np.float64)
        else:
            out[n.name] = np.asarray(probe[n.name] if probe is not None else np.ones(n.channels), np.float64)
    return out


# ---------------------------------------------------------------------------------------------
# The scorer: probe, crucial nodes, the recursive sweep.


@dataclass
class NodeRecord:
    """What RBP learned and decided at one visited node."""

    name: str
    step: int  # position in the visit order
    threshold: float  # |mu| below this was cut (inf: cut to the per-node minimum)
    kept: np.ndarray  # kept channel indices, base numbering
    mu: np.ndarray  # (C,) learned noise mean
    sigma: np.ndarray  # (C,) learned noise std
    reduction: float  # FLOPs reduction once this node is cut (later nodes whole)
    seconds: float


@dataclass
class RBPResult:
    """The record of one RBP run: visit order, per-node records, and the decision."""

    visits: list[str]  # visited nodes in visit order, each once
    crucial: list[str]  # kept whole, never visited (the pipeline mimics them in recovery)
    records: dict[str, NodeRecord]
    plan: Plan  # node -> kept indices (uncut nodes absent)
    flops_reduction: float
    target: float | None  # the FLOPs target solved for; None when the threshold was given
    probe: dict[str, np.ndarray] | None  # |mu| of the joint probe, per node
    decision: Decision  # crucial nodes and kept counts: what the prune takes
    seconds: float


def check_config(cfg: RBPConfig) -> None:
    """Refuse settings that cannot work, naming the key."""
    for key in ("prior_std", "epochs_per_layer", "probe_epochs", "lr"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"scoring.rbp.{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.kl_weight < 0:
        raise ValueError(f"scoring.rbp.kl_weight must be >= 0, got {cfg.kl_weight}")
    if cfg.threshold is not None and cfg.threshold < 0:
        raise ValueError(f"scoring.rbp.threshold must be >= 0 or null, got {cfg.threshold}")
    if cfg.collapse not in ("mean", "one"):
        raise ValueError(f"scoring.rbp.collapse: expected 'mean' or 'one', got {cfg.collapse!r}")


def probe(model: nn.Module, nodes: list[Node], loader, *, cfg: RBPConfig, device: torch.device,
          generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """|mu| of a joint noise pass over every node, nothing decided: the unconditioned posterior,
    used to pick the crucial nodes and to forecast the widths of nodes not visited yet."""
    noisy = {n.name: ChannelNoise(n.channels, init_log_sigma=cfg.init_log_sigma, device=device,
                                  generator=generator) for n in nodes}
    learn_noise(model, nodes, noisy, {}, loader, cfg=cfg, epochs=cfg.probe_epochs, device=device,
                desc="rbp probe")
    return {k: z.mu.detach().abs().cpu().double().numpy() for k, z in noisy.items()}


@dataclass
class _Sweep:
    """Everything one recursive sweep needs."""

    model: nn.Module
    nodes: list[Node]
    loader: object
    cfg: RBPConfig
    limits: Limits
    oracle: FlopsOracle
    device: torch.device
    generator: torch.Generator
    target: float | None
    probe: dict[str, np.ndarray] | None


def _decide(sw: _Sweep, node: Node, mu_abs: np.ndarray, later: list[Node],
            widths: Mapping[str, int]) -> tuple[int, float]:
    """(channels cut, threshold) at ``node``: the given threshold, or one solved for the target."""
    if sw.target is None:
        return threshold_cut(node, mu_abs, sw.cfg.threshold, limits=sw.limits), sw.cfg.threshold
    forecasts = [(n, relative(sw.probe[n.name])) for n in later]
    n_cut, r, _ = solve_cut(node, relative(mu_abs), forecasts, widths, oracle=sw.oracle,
                            limits=sw.limits, target=sw.target)
    return n_cut, r * float(np.mean(mu_abs))


def _visit(sw: _Sweep, step: int, node: Node, later: list[Node], fixed: dict[str, torch.Tensor],
           widths: dict[str, int]) -> NodeRecord:
    """Learn ``node``'s noise on the network decided so far, cut it, and collapse it to a point."""
    t0 = time.perf_counter()
    noise = ChannelNoise(node.channels, init_log_sigma=sw.cfg.init_log_sigma, device=sw.device,
                         generator=sw.generator)
    learn_noise(sw.model, sw.nodes, {node.name: noise}, fixed, sw.loader, cfg=sw.cfg,
                epochs=sw.cfg.epochs_per_layer, device=sw.device, desc=f"rbp {node.name}")
    mu = noise.mu.detach()  # (C,)
    mu_abs = mu.abs().cpu().double().numpy()
    n_cut, threshold = _decide(sw, node, mu_abs, later, widths)
    kept = kept_indices(mu_abs, n_cut)
    fixed[node.name] = collapse(mu, kept, how=sw.cfg.collapse)
    widths[node.name] = len(kept)
    rec = NodeRecord(name=node.name, step=step, threshold=threshold, kept=kept,
                     mu=mu.cpu().double().numpy(), sigma=noise.sigma.detach().cpu().double().numpy(),
                     reduction=sw.oracle.reduction(widths), seconds=time.perf_counter() - t0)
    log.info("rbp %s: cut %d/%d (|mu| < %.4g), FLOPs %.3fx so far, %.1fs", node.name, n_cut,
             node.channels, threshold, rec.reduction, rec.seconds)
    return rec


def sweep(sw: _Sweep, visits: list[Node]) -> dict[str, NodeRecord]:
    """The recursion: visit each node once, input to output; a decided node is never revisited."""
    fixed: dict[str, torch.Tensor] = {}  # decided node -> collapsed gate, (C,)
    widths: dict[str, int] = {}
    records: dict[str, NodeRecord] = {}
    for step, node in enumerate(progress(visits, desc="rbp", leave=False)):
        records[node.name] = _visit(sw, step, node, visits[step + 1:], fixed, widths)
    return records


@SCORERS.register("rbp")
class RBPScorer(Scorer):
    """Recursive Bayesian Pruning (METHOD.md section 7): scores = ``|mu|`` (:func:`mu_scores`),
    and the widths it decided in :attr:`decision`; :attr:`result` holds the visit order and every
    per-node record. Reads ``scoring.rbp`` and the run's :class:`~deploy_prune.decisions.Goal`."""

    needs_data = True

    def __init__(self) -> None:
        self.result: RBPResult | None = None
        self.decision: Decision | None = None

    @classmethod
    def config_of(cls, cfg: RunConfig) -> RBPConfig:
        return cfg.scoring.rbp

    @property
    def visits(self) -> list[str]:
        """Node names in the order the last run visited them."""
        return list(self.result.visits) if self.result else []

    def score(self, ctx: ScoreContext) -> Scores:
        if ctx.train_loader is None:
            raise ValueError("rbp scoring needs training data")
        cfg: RBPConfig = ctx.cfg
        check_config(cfg)
        t0 = time.perf_counter()
        sw = self._setup(ctx)
        nodes = sorted(ctx.nodes, key=lambda n: n.order)
        if sw.target is not None or not ctx.goal.crucial_nodes:  # forecasts or crucial nodes needed
            sw.probe = probe(sw.model, nodes, sw.loader, cfg=cfg, device=sw.device, generator=sw.generator)
        crucial = self._crucial(ctx, nodes, sw.probe)
        # nodes tied to grouped convs are kept whole by RBP (its per-channel cut ignores groups),
        # and so are an MLP head's hidden units (flat: RBP's noise model is per feature-map channel)
        visits = [n for n in nodes if n.prunable and n.groups == 1 and not n.flat and n.name not in crucial]
        log.info("rbp: %d nodes to visit, crucial %s, %s", len(visits), crucial,
                 f"threshold {cfg.threshold}" if sw.target is None else f"target {sw.target}x FLOPs")
        records = sweep(sw, visits)
        self.result = self._finish(ctx, sw, visits, crucial, records, time.perf_counter() - t0)
        self.decision = self.result.decision
        return mu_scores(nodes, records, sw.probe)

    def _setup(self, ctx: ScoreContext) -> _Sweep:
        model = ctx.model.to(ctx.device)
        target = ctx.goal.flops_reduction if ctx.cfg.threshold is None else None
        if target is not None and target < 1.0:
            raise ValueError(f"allocation.flops_reduction must be >= 1.0 (3.0 = 3x fewer FLOPs), got {target}")
        return _Sweep(model=model, nodes=ctx.nodes, loader=ctx.train_loader, cfg=ctx.cfg,
                      limits=Limits.of(ctx.goal), oracle=FlopsOracle(model, ctx.nodes, ctx.example),
                      device=ctx.device, generator=torch.Generator(device=ctx.device).manual_seed(ctx.seed),
                      target=target, probe=None)

    @staticmethod
    def _crucial(ctx: ScoreContext, nodes: list[Node],
                 probed: dict[str, np.ndarray] | None) -> list[str]:
        """Crucial nodes (kept whole, never visited), as in the allocation (METHOD.md section 3):
        ``crucial.nodes``, or the ``crucial.n`` nodes of highest mean |mu| in the probe; plus the
        last conv node."""
        names = list(ctx.goal.crucial_nodes) if ctx.goal.crucial_nodes else None
        return select_crucial(nodes, probed or {}, n=ctx.goal.crucial_n, names=names)

    def _finish(self, ctx: ScoreContext, sw: _Sweep, visits: list[Node], crucial: list[str],
                records: dict[str, NodeRecord], seconds: float) -> RBPResult:
        plan = {k: [int(i) for i in r.kept] for k, r in records.items() if len(r.kept) < len(r.mu)}
        widths = {k: len(v) for k, v in plan.items()}
        red = sw.oracle.reduction(widths)
        if sw.target is not None and red < sw.target * (1 - ctx.goal.tolerance):
            log.warning("rbp reached only %.3fx FLOPs reduction of the %.2fx target", red, sw.target)
        log.info("rbp: %.3fx FLOPs reduction in %.1fs", red, seconds)
        return RBPResult(visits=[n.name for n in visits], crucial=crucial, records=records, plan=plan,
                         flops_reduction=red, target=sw.target, probe=sw.probe,
                         decision=Decision(by="rbp", crucial=list(crucial), widths=widths), seconds=seconds)

