"""Pruning core: FLOPs oracle, zero gates == surgery, plan round trips, allocation, scoring."""

import dataclasses
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from conftest import digits_cfg, random_plan
from deploy_prune import allocation
from deploy_prune.allocation import AllocationError, allocate, cut, resolve_round_to, select_crucial
from deploy_prune.artifacts import ArtifactError, ModelPlan, load_model_dir, save_model_dir
from deploy_prune.config import AllocationConfig
from deploy_prune.data import load_data
from deploy_prune.flops import count
from deploy_prune.gates import ChannelGates
from deploy_prune.models import MODELS, build_model
from deploy_prune.nodes import discover, last_node
from deploy_prune.pipeline import score
from deploy_prune.surgery import PlanError, apply_plan

EXTRA_TV = ["tv.mobilenet_v2", "tv.resnet18", "tv.densenet121", "tv.efficientnet_b0", "tv.regnet_x_400mf"]


def _input(arch: str) -> torch.Tensor:
    side = 32 if not (arch.startswith("tv.") or arch in ("vgg16", "vgg16_bn", "resnet50")) else 64
    return torch.randn(2, 3, side, side)


def test_flops_match_formula():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    c = count(net, torch.zeros(1, 3, 16, 16))
    conv1 = 2 * 16 * 16 * 8 * 3 * 9
    conv2 = 2 * 8 * 8 * 16 * 8 * 9
    fc = 2 * 16 * 8 * 8 * 10
    assert c.flops == conv1 + conv2 + fc
    assert c.per_module == {"0": conv1, "2": conv2, "4": fc}
    assert c.params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20", "tv.mobilenet_v2"])
def test_zero_gates_equal_cut(arch):
    """Gates at zero on some channels give the logits of the model with them cut out."""
    c_in = 1 if arch == "small_vgg" else 3
    model = build_model(arch, num_classes=10, in_channels=c_in).eval()
    # make BN non-trivial so a gate that misses a path would show
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, c_in, 32, 32)
    nodes = discover(model, x[:1])
    plan = random_plan(nodes, frac=0.6)
    masks = {n.name: torch.zeros(n.channels).index_fill_(0, torch.tensor(plan[n.name]), 1.0)
             if n.name in plan else torch.ones(n.channels) for n in nodes}
    with torch.no_grad(), ChannelGates(model, nodes, masks.__getitem__):
        gated = model(x)
    slim = cut(model, plan, x[:1])
    torch.testing.assert_close(slim(x), gated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", MODELS.names() + EXTRA_TV)
def test_surgery_every_model(arch):
    """A random plan on every registered model: plain smaller module, right shapes, no zeros."""
    model = build_model(arch, num_classes=7, in_channels=3).eval()
    x = _input(arch)
    nodes = discover(model, x[:1])
    assert nodes and last_node(nodes).name in {n.name for n in nodes}
    plan = random_plan(nodes, frac=0.5, seed=1)
    before = count(model, x).flops
    apply_plan(model, plan, x[:1])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    assert count(model, x).flops < before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    widths = {n.name: n.channels for n in discover(model, x[:1])}
    for name, kept in plan.items():
        assert widths[name] == len(kept)


def test_plan_round_trip_exact(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=3).eval()
    x = torch.randn(4, 3, 32, 32)
    plan = random_plan(discover(model, x[:1]), frac=0.4, seed=3)
    apply_plan(model, plan, x[:1])
    save_model_dir(model, ModelPlan("resnet20", 10, 3, 32, kept=plan), tmp_path / "m")
    again, p = load_model_dir(tmp_path / "m")
    assert torch.equal(again(x), model(x))
    assert p.kept == plan


def test_mismatched_weights_are_refused(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28), tmp_path / "base")
    plan = random_plan(discover(model, x), frac=0.5)
    save_model_dir(cut(model, plan, x), ModelPlan("small_vgg", 10, 1, 28, kept=plan), tmp_path / "slim")
    (tmp_path / "slim" / "model.safetensors").write_bytes((tmp_path / "base" / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="another plan|do not match the plan"):
        load_model_dir(tmp_path / "slim")
    (tmp_path / "slim" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="truncated|unreadable"):
        load_model_dir(tmp_path / "slim")
    with pytest.raises(ArtifactError, match="not a model directory"):
        load_model_dir(tmp_path / "nowhere")


def test_plan_errors(example_nodes):
    model, x, nodes = example_nodes
    with pytest.raises(PlanError, match="does not have"):
        apply_plan(model, {"features.99": [0]}, x)
    with pytest.raises(PlanError, match="unique and in"):
        apply_plan(model, {nodes[0].name: [0, 0]}, x)
    with pytest.raises(PlanError, match="keeps no channel"):
        apply_plan(model, {nodes[0].name: []}, x)


def test_global_allocation_hits_target(example_nodes):
    model, x, nodes = example_nodes
    rng = np.random.default_rng(0)
    scores = {n.name: rng.random(n.channels) for n in nodes}
    crucial = select_crucial(nodes, scores, n=2)
    assert last_node(nodes).name in crucial and len(crucial) >= 2
    a = allocate(model, nodes, scores, x, crucial=crucial, cfg=AllocationConfig(flops_reduction=3.0, round_to=1))
    assert abs(a.flops_reduction / 3.0 - 1) <= 0.03
    slim = cut(model, a.plan, x)
    assert count(model, x).flops / count(slim, x).flops == pytest.approx(a.flops_reduction)
    for name in crucial:
        assert a.counts[name] == next(n.channels for n in nodes if n.name == name)
    # the globally lowest-scored channels are the ones removed; a kept channel scoring below a
    # removed one is only allowed in a node held at its per-node minimum
    cut_nodes = [n for n in nodes if n.name in a.plan]
    tau = max(s for n in cut_nodes for i, s in enumerate(scores[n.name]) if i not in a.plan[n.name])
    for n in cut_nodes:
        low = [i for i in a.plan[n.name] if scores[n.name][i] < tau]
        if low:
            assert len(a.plan[n.name]) == max(1, int(np.ceil(0.05 * n.channels)))


def test_allocation_rounding_and_minimum(example_nodes):
    model, x, nodes = example_nodes
    scores = {n.name: np.linspace(1, 0, n.channels) for n in nodes}
    crucial = [last_node(nodes).name, nodes[-2].name]
    cfg = AllocationConfig(flops_reduction=2.0, round_to=8, tolerance=0.1)
    a = allocate(model, nodes, scores, x, crucial=crucial, cfg=cfg)
    assert all(c % 8 == 0 for c in a.counts.values())
    cfg = AllocationConfig(target="channels", keep_fraction=0.01, min_fraction=0.25)
    a = allocate(model, nodes, scores, x, crucial=crucial, cfg=cfg)
    for n in nodes:
        assert a.counts[n.name] >= n.channels // 4
    with pytest.raises(AllocationError, match="out of reach"):
        allocate(model, nodes, scores, x, crucial=crucial, cfg=AllocationConfig(flops_reduction=500))
    with pytest.raises(AllocationError, match="crucial.n must be >= 2"):
        select_crucial(nodes, scores, n=1)


def test_beta_scoring_freezes_weights_and_ranks():
    cfg = digits_cfg(scoring__epochs=2)
    data = load_data(cfg.data, seed=0)
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    plan = ModelPlan("small_vgg", 10, 1, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = score(model, plan, cfg, data, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(result["channel_scores"]) == {n["name"] for n in result["nodes"]}
    vals = np.concatenate([np.asarray(v) for v in result["channel_scores"].values()])
    assert vals.std() > 0  # the betas moved, and not all by the same amount
    assert json.loads(json.dumps(result)) == result


def test_data_split_is_deterministic():
    cfg = digits_cfg()
    a = load_data(cfg.data, seed=1)
    b = load_data(cfg.data, seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.num_classes == 10 and a.in_channels == 1 and a.image_size == 8


@pytest.mark.parametrize("command", [["train", "--config", "configs/default.yaml"], ["score", "BASE"],
                                     ["prune", "BASE"]])
def test_existing_output_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    from deploy_prune import commands, pipeline
    from deploy_prune.cli import main

    def no_work(*a, **k):
        raise AssertionError("the command started its work before checking --out")

    for name in ("load_base", "train_base", "setup"):
        monkeypatch.setattr(pipeline, name, no_work)
    monkeypatch.setattr(commands, "load_config", no_work)
    out = tmp_path / "taken"
    out.mkdir()
    argv = [a.replace("BASE", str(tmp_path / "base")) for a in command]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output {out} already exists" in err and "--force" in err


def test_default_rounding_falls_back_only_when_target_is_out_of_reach(example_nodes):
    """Rounding to 8 keeps >= 8 channels per node; a target reachable only with finer widths
    falls back to a finer rounding (recorded), while an explicitly coarser rounding is honoured."""
    import re

    from deploy_prune.allocation import DEFAULT_ROUND_TO, rounding_note

    model, x, nodes = example_nodes
    scores = {n.name: np.linspace(1, 0, n.channels) for n in nodes}
    crucial = [last_node(nodes).name]

    def most(round_to: int) -> float:
        cfg = AllocationConfig(flops_reduction=1e9, round_to=round_to, min_fraction=0.0)
        with pytest.raises(AllocationError, match="out of reach") as e:
            allocation._allocate(model, nodes, scores, x, crucial=crucial, cfg=cfg)
        return float(re.search(r"the most is ([0-9.]+)x", str(e.value)).group(1))

    top8, top1 = most(DEFAULT_ROUND_TO), most(1)
    assert top1 > top8 * 1.05
    target = (top8 + top1) / 2
    cfg = AllocationConfig(flops_reduction=target, min_fraction=0.0, tolerance=0.1)
    a = allocate(model, nodes, scores, x, crucial=crucial, cfg=cfg)
    assert a.flops_reduction >= target * 0.9 and a.extra["round_to"] < DEFAULT_ROUND_TO
    note = rounding_note(cfg, a.extra["round_to"])
    assert note["requested"] == resolve_round_to("auto", "cpu") and "fell back" in note["reason"]
    assert note["setting"] == "auto"
    with pytest.raises(AllocationError, match="out of reach"):  # asked for 16 explicitly: no fallback
        allocate(model, nodes, scores, x, crucial=crucial, cfg=dataclasses.replace(cfg, round_to=16))


@pytest.mark.parametrize(("flags", "device", "want"), [
    ("fpu avx2 avx512f avx512bw", "cpu", 16), ("fpu sse4_2 avx2 fma", "cpu", 8), ("fpu neon", "cpu", 8),
    ("fpu avx2 avx512f", "cuda", 8), ("fpu avx2 avx512f", "cuda:1", 8)])
def test_auto_rounding_follows_the_hardware_channel_block(monkeypatch, tmp_path, flags, device, want):
    """``round_to=auto`` is 16 where CPU kernels block channels in 16s (AVX-512), 8 on AVX2 CPUs
    and on GPUs, read from the CPU's flags, and the plan note says why."""
    from deploy_prune import host
    from deploy_prune.allocation import rounding_note

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(host, "CPUINFO", info)
    assert resolve_round_to("auto", device) == want
    note = rounding_note(AllocationConfig(device=device))
    assert note["round_to"] == want and note["setting"] == "auto" and str(want) in note["reason"]
    assert resolve_round_to(4, device) == 4


def _grouped_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_grouped_conv_nodes_are_cut_group_consistently():
    """The nodes feeding and leaving a grouped conv are tied: they lose whole groups together and
    the conv keeps fewer groups of the same width (tests/test_families.py has the zeroed-group
    oracle). keep_top's per-position rule, for units that cannot be tied, keeps the same
    positions in every group. A plan that breaks the groups is refused by name."""
    from deploy_prune.allocation import keep_top

    model, x = _grouped_net(), torch.randn(2, 3, 8, 8)
    nodes = {n.name: n for n in discover(model, x[:1])}
    assert nodes["0"].groups == 4 and nodes["3"].groups == 4 and nodes["0"].tie == nodes["3"].tie == "0"
    scores = {"0": np.arange(16.0), "3": np.arange(16.0)[::-1].copy()}
    plan = keep_top(scores, {"0": 8, "3": 9}, {"0": 4, "3": 4})  # untied: whole positions per group
    assert plan["0"] == [2, 3, 6, 7, 10, 11, 14, 15] and plan["3"] == [0, 1, 4, 5, 8, 9, 12, 13]
    scores["0"][12:] = -1.0  # group 3 is the weakest of the unit; 17 channels of blocks of 8 -> 2 groups
    plan = keep_top(scores, {"0": 8, "3": 9}, {"0": 4, "3": 4}, {"0": "0", "3": "0"})
    assert plan["0"] == plan["3"] == [0, 1, 2, 3, 4, 5, 6, 7]
    slim = cut(model, plan, x[:1])
    assert (slim[3].groups, slim[3].in_channels, slim[3].out_channels) == (2, 8, 8)
    slim.train()
    assert slim(x).shape == (2, 10)
    with pytest.raises(PlanError, match="whole blocks"):
        apply_plan(_grouped_net(), {"0": list(range(0, 16, 2)), "3": list(range(8))}, x[:1])
    with pytest.raises(PlanError, match="same groups"):
        apply_plan(_grouped_net(), {"0": list(range(8))}, x[:1])


def test_default_rounding_never_misses_a_flops_target_beyond_tolerance(example_nodes):
    """Multiples of 8 move FLOPs in coarse steps: when the nearest step misses the target by more
    than allocation.tolerance (the small VGG landed at 2.72x for 3x), a finer multiple is used."""
    model, x, nodes = example_nodes
    rng = np.random.default_rng(0)
    crucial = [last_node(nodes).name]
    for target in (1.5, 2.0, 2.5, 3.0, 3.5):
        scores = {n.name: rng.random(n.channels) for n in nodes}
        cfg = AllocationConfig(flops_reduction=target, min_fraction=0.0)
        a = allocate(model, nodes, scores, x, crucial=crucial, cfg=cfg)
        assert abs(a.flops_reduction / target - 1) <= cfg.tolerance, (target, a.flops_reduction)
        used = a.extra.get("round_to", cfg.round_to)
        assert all(c % used == 0 or c == n.channels for n in nodes for c in [a.counts[n.name]])


@pytest.mark.parametrize("override", ["allocation.round_to=fast", "allocation.normalize=max", "allocation.round_to=0",
                                      "allocation.tolerance=-1"])
def test_stage_configs_on_a_base_are_validated(override):
    """prune/recover/export resolve their config from the base directory plus overrides; a bad
    value is the one-line config error naming the key, not a crash deep in the allocation."""
    from deploy_prune.config import ConfigError
    from deploy_prune.pipeline import resolve_base_config

    base = ModelPlan("small_vgg", 10, 1, 28)
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        resolve_base_config(base, None, [override])
    assert resolve_base_config(base, None, ["allocation.round_to=16"]).allocation.round_to == 16


def test_l1_scores_are_ranked_relative_to_their_node_and_crucial_nodes_use_the_raw_norms():
    """L1 norms grow with fan-in: the global ranking divides each node's scores by their mean
    (allocation.normalize=auto resolves to mean for l1), so a layer scaled by 10 is cut as
    before and a wide-fan-in layer is narrowed too; crucial selection still ranks nodes by
    their raw mean norm (the normalised means are all 1: no information)."""
    from deploy_prune.config import RunConfig
    from deploy_prune.pipeline import normalized
    from deploy_prune.scoring import SCORERS, ScoreContext

    torch.manual_seed(0)
    model = build_model("tv.resnet18", num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 3, 64, 64)
    nodes = discover(model, x)
    cfg = RunConfig()
    assert normalized(cfg, "l1").allocation.normalize == "mean"
    assert normalized(cfg, "beta").allocation.normalize == "mean"
    assert normalized(cfg, "rbp").allocation.normalize == "none"
    assert normalized(cfg).allocation.normalize == "mean"  # the default scorer: beta
    acfg = dataclasses.replace(normalized(cfg, "l1").allocation, flops_reduction=2.0, round_to=1)
    scores = SCORERS.get("l1")().score(ScoreContext(model=model, nodes=nodes, example=x))
    crucial = select_crucial(nodes, scores, n=2)
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    assert crucial[:-1] == sorted(sorted(means, key=lambda k: -means[k])[:2], key=[n.name for n in nodes].index) \
        or last_node(nodes).name in crucial[:2]
    a = allocate(model, nodes, scores, x, crucial=crucial, cfg=acfg)
    late = [n for n in nodes if n.name.startswith(("layer3", "layer4")) and n.name in a.plan]
    assert late, f"no layer3/4 node was narrowed: {sorted(a.plan)}"
    scaled = dict(scores, **{late[0].name: scores[late[0].name] * 10.0})
    assert allocate(model, nodes, scaled, x, crucial=crucial, cfg=acfg).plan == a.plan
    raw = allocate(model, nodes, scaled, x, crucial=crucial, cfg=dataclasses.replace(acfg, normalize="none"))
    assert raw.plan != a.plan  # without the division, the scaled layer's channels all survive


def test_flops_search_finds_what_bisection_finds_in_fewer_cuts():
    """The interpolated search returns bisection's answer on monotone step functions (plateaus from
    rounding, flat ends, exact hits) and, on smooth ones, cuts fewer copies of the model."""
    from deploy_prune.allocation import _first_meeting

    def bisection(red, total, target):
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if red(mid) >= target else (mid + 1, hi)
        return lo

    def probe(curve, calls, k):
        calls.append(k)
        return int(curve[k])

    rng = np.random.default_rng(0)
    fewer = 0
    for trial in range(300):
        total, base = int(rng.integers(1, 3000)), 10_000_000
        steps = np.sort(rng.random(total))[::-1] if trial % 3 else np.linspace(1, 0, total)
        step = int(rng.choice([1, 1, 16, 64]))  # plateaus, as widths rounded to multiples give
        curve = base * (0.05 + 0.95 * steps[(np.arange(total + 1) // step * step).clip(max=total - 1)])
        curve[0] = base
        target = float(rng.uniform(1.0, base / curve[total]))
        calls: list[int] = []
        got = _first_meeting(partial(probe, curve, calls), total, base, target, [])
        assert got == bisection(lambda k, c=curve, b=base: b / max(int(c[k]), 1), total, target), trial
        fewer += len(set(calls)) < math.ceil(math.log2(total + 1)) + 1
    assert fewer > 200, fewer  # most searches cut fewer copies than bisection would


def test_out_of_reach_names_the_crucial_nodes_kept_whole():
    from deploy_prune import pipeline
    from deploy_prune.config import RunConfig

    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    plan = ModelPlan("small_vgg", 10, 1, 32)
    nodes = discover(model, plan.example())
    scores = {n.name: np.ones(n.channels) for n in nodes}
    cfg = RunConfig()
    cfg.allocation.flops_reduction = 40.0
    crucial = [nodes[0].name, last_node(nodes).name]
    with pytest.raises(allocation.OutOfReach) as e:
        pipeline.prune(model, plan, cfg, scores, crucial=crucial)
    msg = str(e.value)
    assert "out of reach" in msg and "\n" not in msg
    assert f"crucial nodes, kept whole: {nodes[0].name}, {last_node(nodes).name} (2 of {len(nodes)} nodes" in msg
