"""Recursive Bayesian Pruning (METHOD.md section 7): the KL term, the noise, the cut, the
recursion, and that the scores hand RBP's decisions to the global allocation unchanged."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from deploy_prune import allocation
from deploy_prune.artifacts import ModelPlan
from deploy_prune.config import AllocationConfig, RBPConfig, RunConfig, from_dict
from deploy_prune.data import load_data
from deploy_prune.gates import ChannelGates
from deploy_prune.models import build_model
from deploy_prune.nodes import discover
from deploy_prune.pipeline import prune
from deploy_prune.scoring import SCORERS, Goal, ScoreContext, rbp
from deploy_prune.surgery import apply_plan
from deploy_prune.train import cross_entropy, fit, make_optimizer, steps_for


def _cfg(**rbp_over) -> RunConfig:
    """Digits, small_vgg, tiny RBP budgets; ``rbp_over`` sets scoring.rbp fields."""
    return from_dict(RunConfig, {
        "data": {"name": "digits", "batch_size": 64},
        "scoring": {"rbp": {"epochs_per_layer": 0.5, "probe_epochs": 0.5, **rbp_over}},
        "allocation": {"flops_reduction": 1.8},
    })


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """8x8 inputs: one thread is faster than two, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """small_vgg trained briefly on sklearn digits (8x8), its nodes, an example and the data."""
    torch.manual_seed(0)
    data = load_data(_cfg().data, seed=0)
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    opt = make_optimizer(model.parameters(), name="sgd", lr=0.05)
    model.train()
    fit(model, data.train, steps=steps_for(3, data.train), loss_fn=cross_entropy(), optimizer=opt)
    model.eval()
    example = torch.zeros(1, 1, 8, 8)
    return model, discover(model, example), example, data


def _ctx(model, nodes, example, data, cfg: RunConfig) -> ScoreContext:
    """What the pipeline hands RBP: its own section (scoring.rbp) and the run's goal, nothing else."""
    return ScoreContext(model=model, nodes=nodes, example=example, cfg=rbp.RBPScorer.config_of(cfg),
                        train_loader=data.train, seed=0, goal=Goal.of(cfg))


def _run(digits, cfg: RunConfig) -> tuple[rbp.RBPScorer, dict[str, np.ndarray], torch.nn.Module]:
    model, nodes, example, data = digits
    model = copy.deepcopy(model)
    scorer = SCORERS.get("rbp")()
    scores = scorer.score(_ctx(model, nodes, example, data, cfg))
    return scorer, scores, model


# --- the KL term and the noise ------------------------------------------------------------------


def test_kl_matches_closed_form_and_torch():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(50, generator=g, dtype=torch.float64) * 2
    log_s = torch.randn(50, generator=g, dtype=torch.float64) - 1
    t = 0.3
    s = log_s.exp()
    closed = torch.log(t / s) + (s**2 + mu**2) / (2 * t**2) - 0.5
    got = rbp.gaussian_kl(mu, log_s, t)
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, kl_divergence(Normal(mu, s), Normal(torch.zeros_like(mu), t)))
    noise = rbp.ChannelNoise(50, init_log_sigma=0.0)
    with torch.no_grad():
        noise.mu.copy_(mu.float())
        noise.log_sigma.copy_(log_s.float())
    torch.testing.assert_close(noise.kl(t), closed.sum().float())
    assert float(rbp.gaussian_kl(torch.zeros(1), torch.tensor([math.log(t)]), t)) == pytest.approx(0.0, abs=1e-6)


def test_noise_samples_have_the_right_mean_variance_and_gradient():
    g = torch.Generator().manual_seed(2)
    noise = rbp.ChannelNoise(4, init_log_sigma=0.0, generator=g)
    mu, sigma = torch.tensor([1.0, 0.0, -0.5, 2.0]), torch.tensor([0.1, 0.5, 1.0, 0.01])
    with torch.no_grad():
        noise.mu.copy_(mu)
        noise.log_sigma.copy_(sigma.log())
    n = 200_000
    draws = noise.sample(n)  # (n, 4)
    assert draws.shape == (n, 4)
    torch.testing.assert_close(draws.mean(0), mu, rtol=0, atol=float(5 * sigma.max() / math.sqrt(n)))
    torch.testing.assert_close(draws.var(0), sigma**2, rtol=0.02, atol=1e-6)
    draws.sum().backward()  # reparameterised: d theta / d mu = 1, d theta / d log s = s * eps
    torch.testing.assert_close(noise.mu.grad, torch.full((4,), float(n)))
    theta = noise.resample()
    assert theta.shape == (4,) and noise.theta is theta


# --- the cut ------------------------------------------------------------------------------------


def _randomise_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize(("arch", "side", "node_name"), [
    ("small_vgg", 8, "features.7"),
    ("resnet20", 16, "layer2.2"),  # a junction node: every producer's BN is gated
])
def test_zero_mean_channel_is_cut_and_the_rest_matches(arch, side, node_name):
    model = build_model(arch, num_classes=10, in_channels=1).eval()
    _randomise_bn(model)
    example = torch.zeros(1, 1, side, side)
    nodes = discover(model, example)
    node = next(n for n in nodes if n.name == node_name)
    noise = rbp.ChannelNoise(node.channels, init_log_sigma=-3.0)
    with torch.no_grad():
        noise.mu[5] = 0.0  # the prior has driven this channel's noise mean to zero
    mu_abs = noise.mu.detach().abs().double().numpy()
    n_cut = rbp.threshold_cut(node, mu_abs, 0.5, limits=rbp.Limits())
    kept = rbp.kept_indices(mu_abs, n_cut)
    assert n_cut == 1 and 5 not in kept and len(kept) == node.channels - 1
    gate = rbp.collapse(noise.mu, kept, how="mean")  # (C,): 1 everywhere but channel 5
    x = torch.randn(4, 1, side, side, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ChannelGates(model, [node], lambda _: gate):
        gated = model(x)
    slim = apply_plan(copy.deepcopy(model), {node.name: [int(i) for i in kept]}, example)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(slim(x), gated, rtol=0, atol=1e-5)


def test_limits_follow_the_allocation_rule():
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    node = discover(model, torch.zeros(1, 1, 8, 8))[2]
    for cfg in (AllocationConfig(), AllocationConfig(min_fraction=0.3, round_to=8),
                AllocationConfig(min_channels=5, round_to=4)):
        ranking = allocation._Ranking([node], {node.name: np.arange(node.channels, dtype=float)}, cfg)
        limits = rbp.Limits.of(Goal.of(RunConfig(allocation=cfg)))
        for k in range(node.channels + 1):
            assert limits.kept(node.channels, k) == ranking.counts(k)[node.name]


# --- the recursion --------------------------------------------------------------------------------


def test_recursion_visits_in_order_and_never_revisits(digits, monkeypatch):
    calls = []
    real = rbp.learn_noise

    def spy(model, nodes, noisy, fixed, loader, **kw):
        calls.append((list(noisy), {k: v.detach().clone() for k, v in fixed.items()}))
        return real(model, nodes, noisy, fixed, loader, **kw)

    monkeypatch.setattr(rbp, "learn_noise", spy)
    scorer, _, _ = _run(digits, _cfg())
    nodes = digits[1]
    res = scorer.result
    expected = [n.name for n in sorted(nodes, key=lambda n: n.order)
                if n.prunable and n.name not in res.crucial]
    assert scorer.visits == expected and len(set(scorer.visits)) == len(scorer.visits)
    assert len(expected) >= 2
    probe, sweep = calls[0], calls[1:]
    assert sorted(probe[0]) == sorted(n.name for n in nodes) and not probe[1]  # joint probe first
    assert [noisy for noisy, _ in sweep] == [[name] for name in expected]  # one node at a time
    final = {k: v for k, v in sweep[-1][1].items()}
    for i, (_, fixed) in enumerate(sweep):
        assert list(fixed) == expected[:i]  # every earlier node decided, no later one
        for name, gate in fixed.items():  # a decided node's point never changes afterwards
            torch.testing.assert_close(gate, final.get(name, gate), rtol=0, atol=0)
    for step, name in enumerate(expected):
        rec = res.records[name]
        assert rec.step == step
        cut = np.setdiff1d(np.arange(len(rec.mu)), rec.kept)
        gate = sweep[step + 1][1][name] if step + 1 < len(sweep) else None
        if gate is not None:
            assert torch.all(gate[torch.as_tensor(cut, dtype=torch.long)] == 0)
        if len(cut):  # the smallest |mu| are the ones cut
            assert np.abs(rec.mu)[cut].max() <= np.abs(rec.mu)[rec.kept].min()


# --- end to end -------------------------------------------------------------------------------------


def test_the_decision_is_the_cut_and_the_prune_takes_it(digits):
    cfg = _cfg()
    scorer, scores, model = _run(digits, cfg)
    _, nodes, example, _ = digits
    res = scorer.result
    assert {n.name: len(scores[n.name]) for n in nodes} == {n.name: n.channels for n in nodes}
    assert res.plan and scorer.decision is res.decision
    assert res.flops_reduction == pytest.approx(cfg.allocation.flops_reduction, rel=cfg.allocation.tolerance)
    assert res.decision.crucial == res.crucial
    assert res.decision.widths == {k: len(v) for k, v in res.plan.items()}
    for name, rec in res.records.items():  # the scores are the learned |mu|, nothing encoded
        np.testing.assert_array_equal(scores[name], np.abs(rec.mu))
    base = ModelPlan("small_vgg", 10, 1, 8)
    pruned = prune(model, base, cfg, scores, decision=res.decision)
    assert pruned.allocation.plan == res.plan and pruned.allocation.crucial == res.crucial
    assert pruned.plan.info["decided_by"] == "rbp"
    assert pruned.allocation.flops_reduction == pytest.approx(res.flops_reduction)
    # without the decision the same scores go through the global allocation (a different cut)
    assert prune(model, base, cfg, scores).plan.info.get("decided_by") is None


def test_the_decision_survives_scores_json_and_is_checked(digits, tmp_path):
    from deploy_prune import pipeline

    model, nodes, example, data = digits
    cfg = _cfg()
    base = ModelPlan("small_vgg", 10, 1, 8)
    result = pipeline.score(copy.deepcopy(model), base, cfg, data, torch.device("cpu"), method="rbp")
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(result))
    scores, decision = pipeline.read_scored(path, base)
    assert decision is not None and decision.by == "rbp" and decision.widths
    assert prune(model, base, cfg, scores, decision=decision).plan.info["widths"] == {
        n.name: decision.widths.get(n.name, n.channels) for n in nodes}
    bad = dict(result, decision={**result["decision"], "widths": {"nope": 3}})
    path.write_text(json.dumps(bad))
    scores, decision = pipeline.read_scored(path, base)
    with pytest.raises(ValueError, match="nope"):
        prune(model, base, cfg, scores, decision=decision)
    path.write_text(json.dumps(dict(result, decision={"crucial": [], "widths": {"features.0": 0}})))
    with pytest.raises(ValueError, match="positive integers"):
        pipeline.read_scored(path, base)


def test_given_threshold_cuts_small_mu(digits):
    cfg = _cfg(threshold=0.9)
    cfg = dataclasses.replace(cfg, crucial=dataclasses.replace(cfg.crucial, nodes=["features.3"]))
    scorer, scores, model = _run(digits, cfg)
    res = scorer.result
    assert res.target is None and res.probe is None  # crucial nodes named: no probe needed
    assert res.crucial == ["features.3", "features.18"]
    limits = rbp.Limits.of(Goal.of(cfg))
    for rec in res.records.values():
        below = np.abs(rec.mu) < 0.9
        if len(rec.mu) - below.sum() >= limits.kept(len(rec.mu), len(rec.mu)):
            np.testing.assert_array_equal(rec.kept, np.flatnonzero(~below))
    pruned = prune(model, ModelPlan("small_vgg", 10, 1, 8), cfg, scores, decision=res.decision)
    assert pruned.allocation.plan == res.plan


@pytest.mark.parametrize(("key", "value"), [("prior_std", 0.0), ("kl_weight", -1.0), ("lr", 0.0),
                                             ("epochs_per_layer", 0.0), ("threshold", -0.1),
                                             ("collapse", "median")])
def test_bad_settings_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"scoring.rbp.{key}"):
        rbp.check_config(dataclasses.replace(RBPConfig(), **{key: value}))


def test_resnet_junction_nodes_are_visited_and_decided(digits):
    data = digits[3]
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    opt = make_optimizer(model.parameters(), name="sgd", lr=0.05)
    fit(model.train(), data.train, steps=10, loss_fn=cross_entropy(), optimizer=opt)
    model.eval()
    example = torch.zeros(1, 1, 8, 8)
    nodes = discover(model, example)
    cfg = _cfg(epochs_per_layer=0.1, probe_epochs=0.1)  # the structure is checked, not accuracy
    cfg = dataclasses.replace(cfg, crucial=dataclasses.replace(cfg.crucial, nodes=["layer1.0.conv1", "layer2.0.conv1"]))
    scorer = SCORERS.get("rbp")()
    scores = scorer.score(_ctx(model, nodes, example, data, cfg))
    junctions = [n.name for n in nodes if n.is_junction and n.name not in scorer.result.crucial]
    assert junctions and set(junctions) <= set(scorer.visits)
    alloc = allocation.decided(model, nodes, scores, example, scorer.decision)
    assert alloc.plan == scorer.result.plan
