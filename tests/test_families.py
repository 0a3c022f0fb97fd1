"""The family matrix: every torchvision classifier prunes at 2x (or, for transformers, is
refused with one line naming the cause), runs in eval and train mode,
exports to ONNX with parity and gives one bench row. A few fast models run in CI; the rest are
``slow`` (docs/results/families.md has the whole matrix, made by ``python -m bench.families``)."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bench.families import check_one
from bench.timing import TimingConfig
from deploy_prune.allocation import (
    allocate,
    cut,
    group_counts,
    group_ties,
    keep_top,
    prunable_nodes,
    tied_scores,
)
from deploy_prune.config import AllocationConfig
from deploy_prune.nodes import Node, discover
from deploy_prune.surgery import PlanError, apply_plan

FAST = {"mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5", "vit_b_32"}
TRANSFORMERS = ("vit_", "swin_", "maxvit_")
TINY = TimingConfig(warmup_s=0.0, warmup_iters=2, min_time_s=0.05, rounds=2, min_samples=4, min_per_round=2,
                    clock="cpu")
ALL = torchvision.models.list_models(module=torchvision.models)


pytestmark = pytest.mark.usefixtures("one_thread")  # timings and traces on one thread, as the matrix runs


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ALL])
def test_family_prunes_exports_and_times_or_is_refused_in_one_line(name):
    row = check_one(name, timing=TINY, size=None if name in ("inception_v3",) else 64)
    if name.startswith(TRANSFORMERS):
        assert row["status"] == "refused" and "transformer" in row["detail"] and "\n" not in row["detail"]
        return
    assert row["status"] == "ok", row
    assert row["prunable"] > 0
    assert abs(row["flops_got"] / 2.0 - 1) <= 0.05, row  # the 2x target, within 5%
    assert row["parity"] == "pass"
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("speedup", "speedup_low", "speedup_high"))
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]


# -- grouped convolutions lose whole groups (ResNeXt, RegNet) ---------------------------------


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrongly sliced channel shows in the output."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5), (m.weight.data, 0.5, 1.5),
                              (m.bias.data, -0.1, 0.1)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.eval()


def _grouped_block() -> nn.Module:
    """A ResNeXt-style bottleneck with a residual: conv 8->16, grouped conv 16->16 (4 groups), conv 16->8."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
            self.c = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            x = self.stem(x)
            return self.head(torch.relu(x + self.c(self.b(self.a(x)))))

    torch.manual_seed(0)
    return _randomise_bn(Block())


def _zero_groups(model: nn.Module, nodes: list[Node], drop: list[int]) -> nn.Module:
    """A copy of ``model`` whose tied nodes' channels in groups ``drop`` are exactly zero (their
    producers' filters and BatchNorm affine zeroed): the oracle for cutting those groups."""
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    for n in (n for n in nodes if n.tie):
        w = n.channels // n.groups
        for name in (*n.producers, *n.gates):
            for t in (modules[name].weight, modules[name].bias):
                for g in drop:
                    if t is not None:
                        t.data[g * w:(g + 1) * w] = 0
    return zeroed


def _kept_plan(nodes: list[Node], drop: list[int]) -> dict[str, list[int]]:
    plan = {}
    for n in (n for n in nodes if n.tie):
        w = n.channels // n.groups
        plan[n.name] = [g * w + j for g in range(n.groups) if g not in drop for j in range(w)]
    return plan


def test_grouped_conv_loses_whole_groups_and_equals_the_base_with_those_groups_zeroed():
    """Cutting groups 1 and 3 of a 4-group conv leaves 2 groups of the same width (weights
    (8, 4, 3, 3)), and the cut model computes exactly what the base computes when those groups'
    channels are zero; any misaligned slice (a kept group reading a removed block) would differ."""
    model, x = _grouped_block(), torch.randn(3, 3, 8, 8)
    nodes = {n.name: n for n in discover(model, x[:1])}
    assert nodes["a.0"].tie == nodes["b.0"].tie == "a.0" and nodes["a.0"].groups == 4
    assert not nodes["stem.0"].tie  # the residual node (stem + c)
    scores = {"a.0": np.repeat([4.0, 0.0, 3.0, 1.0], 4), "b.0": np.repeat([4.0, 1.0, 3.0, 0.0], 4)}
    plan = keep_top(scores, {"a.0": 8, "b.0": 8}, group_counts(list(nodes.values())),
                    group_ties(list(nodes.values())))
    assert plan == {"a.0": [0, 1, 2, 3, 8, 9, 10, 11], "b.0": [0, 1, 2, 3, 8, 9, 10, 11]}
    slim = cut(model, plan, x[:1])
    b = slim.b[0]
    assert (b.groups, b.in_channels, b.out_channels, tuple(b.weight.shape)) == (2, 8, 8, (8, 4, 3, 3))
    with torch.no_grad():
        want = _zero_groups(model, list(nodes.values()), [1, 3])(x)
        torch.testing.assert_close(slim(x), want, rtol=0, atol=1e-6)
        assert (model(x) - want).abs().max() > 1e-3  # the zeroed groups mattered: the oracle can fail


def test_a_plan_must_keep_whole_groups_the_same_in_every_tied_node():
    model, x = _grouped_block(), torch.randn(1, 3, 8, 8)
    with pytest.raises(PlanError, match="whole blocks of 4 channels"):
        apply_plan(copy.deepcopy(model), {"a.0": list(range(6)), "b.0": list(range(8))}, x)
    with pytest.raises(PlanError, match="same groups"):
        apply_plan(copy.deepcopy(model), {"a.0": list(range(8)), "b.0": list(range(8, 16))}, x)
    with pytest.raises(PlanError, match="same groups"):  # one tied node cut, its partner kept whole
        apply_plan(copy.deepcopy(model), {"a.0": list(range(8))}, x)


def test_global_ranking_scores_a_group_by_its_mean_channel_score_and_meets_a_flops_target():
    """A tied unit's groups compete with single channels at their mean score; a FLOPs target is
    met within tolerance with whole groups, and the cut conv has fewer groups of the same width."""
    model, x = _grouped_block(), torch.randn(1, 3, 8, 8)
    nodes = discover(model, x)
    tied = tied_scores(nodes, {"a.0": np.arange(16.0), "b.0": np.arange(16.0) + 16, "stem.0": np.ones(8)})
    np.testing.assert_allclose(tied["a.0"], np.repeat([9.5, 13.5, 17.5, 21.5], 4))  # mean of 1.5+17.5 ...
    np.testing.assert_allclose(tied["b.0"], tied["a.0"])
    rng = np.random.default_rng(0)
    scores = {n.name: rng.random(n.channels) for n in nodes}
    cfg = AllocationConfig(flops_reduction=1.5, min_fraction=0.0, round_to=1)
    a = allocate(model, nodes, scores, x, crucial=[], cfg=cfg)
    assert abs(a.flops_reduction / 1.5 - 1) <= cfg.tolerance, a.flops_reduction
    assert len(a.plan.get("a.0", range(16))) == len(a.plan.get("b.0", range(16)))
    b = cut(model, a.plan, x).b[0]
    assert b.in_channels // b.groups == 4 and b.out_channels // b.groups == 4


def test_a_unit_with_a_crucial_node_is_kept_whole():
    model, x = _grouped_block(), torch.randn(1, 3, 8, 8)
    nodes = discover(model, x)
    names = {n.name for n in prunable_nodes(nodes, ["b.0"])}
    assert "a.0" not in names and "stem.0" in names


@pytest.mark.parametrize("name", [pytest.param("regnet_x_400mf"),
                                  pytest.param("regnet_y_400mf"),
                                  pytest.param("resnext50_32x4d", marks=pytest.mark.slow)])
def test_torchvision_grouped_nets_lose_whole_groups_equal_to_the_zeroed_base(name):
    """Every ResNeXt/RegNet bottleneck's grouped conv loses a third of its groups; the cut model
    equals the base with those groups' channels zeroed (RegNet-Y: through the SE too)."""
    model = _randomise_bn(getattr(torchvision.models, name)(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    nodes = discover(model, x[:1])
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
    assert sum(bool(n.tie) for n in nodes) == 2 * len(grouped) > 0  # each conv: the node in, the node out
    groups = {n.groups for n in nodes if n.tie}
    drop = [g for g in range(min(groups)) if g % 3 == 1]  # groups 1, 4, 7, ... of every unit
    slim = cut(model, _kept_plan(nodes, drop), x[:1])
    base_convs = dict(model.named_modules())
    for cname, conv in slim.named_modules():
        old = base_convs[cname]
        if isinstance(conv, nn.Conv2d) and old.groups > 1 and old.groups != old.out_channels:
            assert conv.groups == old.groups - len(drop), cname
            assert conv.in_channels // conv.groups == old.in_channels // old.groups, cname
    with torch.no_grad():
        torch.testing.assert_close(slim(x), _zero_groups(model, nodes, drop)(x), rtol=1e-4, atol=1e-6)
    slim.train()(x)  # train mode runs too


@pytest.mark.slow
def test_regnet_pruned_by_groups_at_2x_rebuilds_from_its_plan():
    """regnet_x_400mf at 2x fewer FLOPs (L1 scores, defaults): the grouped convs lose groups, and
    the saved plan rebuilds the same model (deploy_prune.save/load and load_model_dir)."""
    from bench.families import prune_one
    from deploy_prune import api
    from deploy_prune.artifacts import load_model_dir

    base, plan, res = prune_one("regnet_x_400mf", size=32)
    assert abs(res.plan.info["flops_reduction"] / 2.0 - 1) <= 0.05
    fewer = [n for n, m in res.slim.named_modules() if isinstance(m, nn.Conv2d)
             and m.groups < dict(base.named_modules())[n].groups]
    assert len(fewer) >= 5, fewer
    x = torch.randn(2, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        api.save(res.slim, res.plan, Path(tmp) / "slim")
        for again, _ in (api.load(Path(tmp) / "slim"), load_model_dir(Path(tmp) / "slim")):
            with torch.no_grad():
                torch.testing.assert_close(again(x), res.slim.eval()(x), rtol=0, atol=0)


# -- channel shuffle (ShuffleNetV2): the channels inside each branch prune, the shuffled ones stay --


def _shuffle_net() -> nn.Module:
    """conv 3->8, a ShuffleNetV2 unit (half the channels pass, the other half go through
    1x1 4->6 -> depthwise 6 -> 1x1 6->4), concat, channel shuffle, conv 8->8, head."""

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.branch = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
                                        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6),
                                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.tail = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            x1, x2 = self.stem(x).chunk(2, dim=1)
            y = torch.cat((x1, self.branch(x2)), dim=1)  # (B, 8, H, W)
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)  # shuffle
            return self.head(self.tail(y))

    torch.manual_seed(0)
    return _randomise_bn(Unit())


def test_channel_shuffle_keeps_the_shuffled_channels_and_prunes_inside_the_branch():
    """The branch's internal channels (1x1 -> depthwise -> 1x1) are cut; the channels entering the
    shuffle are kept whole with one line naming the reshape; the cut equals the base with those
    internal channels zeroed."""
    model, x = _shuffle_net(), torch.randn(2, 3, 8, 8)
    nodes = {n.name: n for n in discover(model, x[:1])}
    assert nodes["branch.0"].prunable and nodes["tail.0"].prunable
    for conv in ("stem.0", "branch.5"):  # the convs whose channels enter the shuffle
        node = next(n for n in nodes.values() if conv in n.producers)
        assert not node.prunable and node.fixed.endswith("(channel shuffle: view (1, 8, 8, 8) -> (1, 2, 4, 8, 8) in the "
                                                          "top module)"), node.fixed
    slim = cut(model, {"branch.0": [0, 2, 5]}, x[:1])
    assert (slim.branch[0].out_channels, slim.branch[3].groups, slim.branch[5].in_channels) == (3, 3, 3)
    zeroed = copy.deepcopy(model)
    for t in (zeroed.branch[1].weight, zeroed.branch[1].bias):
        t.data[[1, 3, 4]] = 0  # the BNs after the first 1x1 and the depthwise: those channels are 0
    for t in (zeroed.branch[4].weight, zeroed.branch[4].bias):
        t.data[[1, 3, 4]] = 0
    with torch.no_grad():
        torch.testing.assert_close(slim(x), zeroed(x), rtol=0, atol=1e-6)
    with pytest.raises(PlanError, match="cannot be narrowed .*channel shuffle"):
        apply_plan(copy.deepcopy(model), {"stem.0": list(range(6))}, x[:1])


def test_a_model_whose_every_node_feeds_a_shuffle_is_refused_in_one_line():
    class AllShuffled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.conv(x)
            y = y.view(y.shape[0], 2, 4, *y.shape[2:]).transpose(1, 2).reshape(y.shape)
            return self.head(y.mean((2, 3)))

    model, x = AllShuffled().eval(), torch.randn(1, 3, 8, 8)
    nodes = discover(model, x)
    with pytest.raises(ValueError, match=r"no prunable node .*conv\.0: its channels pass through a reshape") as e:
        prunable_nodes(nodes, [])
    assert "\n" not in str(e.value)


def test_a_builder_that_reads_tensor_values_passes_the_size_check():
    """torchvision RegNet computes its widths with tensors, which the meta device cannot read:
    the size check builds it with only the parameters on meta (load_model_dir used to refuse it)."""
    from deploy_prune.artifacts import check_model_size

    check_model_size("tv.regnet_x_400mf", num_classes=10, in_channels=3, source="plan.json")


def test_groups_reached_through_a_concat_are_not_tied_and_say_so_in_one_line(caplog):
    """A grouped conv fed by a concat of two convs: its groups are not whole blocks of either
    node, so those nodes are kept whole (the reason in ``Node.fixed`` and one warning line),
    and the conv's own output keeps the same positions in every group; any cut still runs."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.g = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

        def forward(self, x):
            return self.head(self.g(torch.cat([self.a(x), self.b(x)], 1)))

    model, x = Cat().eval(), torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="deploy_prune.nodes"):
        nodes = {n.name: n for n in discover(model, x[:1])}
    assert not nodes["a.0"].prunable and "g.0 through a concat" in nodes["a.0"].fixed and not nodes["a.0"].tie
    assert nodes["g.0"].prunable and nodes["g.0"].groups == 4 and not nodes["g.0"].tie
    lines = [r.getMessage() for r in caplog.records if "not cut by whole groups" in r.getMessage()]
    assert len(lines) <= 1 and all("\n" not in m for m in lines)  # once per process
    slim = cut(model, {"g.0": [0, 1, 4, 5, 8, 9, 12, 13]}, x[:1])
    assert (slim.g[0].groups, slim.g[0].out_channels) == (4, 8) and slim(x).shape == (2, 2)


def test_matrix_settings_reach_the_allocation():
    """``bench.families run --set allocation.round_to=8`` prunes with that rounding; without it the
    defaults (auto: the hardware's channel block) apply and are recorded."""
    from bench.families import prune_one
    from deploy_prune.allocation import resolve_round_to

    _, _, eight = prune_one("squeezenet1_1", size=32, overrides=["allocation.round_to=8"])
    _, _, auto = prune_one("squeezenet1_1", size=32)
    assert eight.plan.info["rounding"]["setting"] == 8
    assert auto.plan.info["rounding"]["setting"] == "auto"
    for res in (eight, auto):
        m = res.plan.info["rounding"]["round_to"]
        cut_widths = [w for n, w in res.plan.info["widths"].items() if w != res.plan.info["base_widths"][n]]
        assert cut_widths and all(w % m == 0 for w in cut_widths)
    assert auto.plan.info["rounding"]["requested" if "requested" in auto.plan.info["rounding"] else "round_to"] \
        == resolve_round_to("auto", "cpu")


def test_compare_page_sets_two_runs_side_by_side(tmp_path):
    """`bench.families compare` keeps the models measured in both runs and medians each side."""
    import csv

    from bench.families import FIELDS, main

    def write(path, effs):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            for m, e in effs.items():
                w.writerow({"model": m, "status": "ok" if e else "timeout", "flops_got": 2.0,
                            "speedup": 2 * (e or 0), "speedup_low": 1.0, "speedup_high": 3.0, "efficiency": e})

    write(tmp_path / "a.csv", {"m1": 0.9, "m2": 0.8, "m3": 0.7, "only_a": 0.1})
    write(tmp_path / "b.csv", {"m1": 0.6, "m2": 0.85, "m3": 0.5, "only_a": None})
    page = tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--labels", "16", "8",
                 "--page", str(page)]) == 0
    text = page.read_text()
    assert "3 models measured under both" in text and "**16 0.80**" in text and "**8 0.60**" in text
    assert "ahead on 2 of 3" in text and "only_a" not in text
    write(tmp_path / "c.csv", {"other": 0.5})
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "c.csv"), "--page", str(page)]) == 2


def test_token_attention_is_refused_by_name_but_channel_gates_are_not():
    """Swin V2's ShiftedWindowAttentionV2 is refused at once (it once went to the tracer and hung);
    a CNN whose gate module is called ChannelAttention still prunes."""
    from deploy_prune.nodes import UnsupportedModel, discover, refuse_unsupported

    class ShiftedWindowAttentionV2(nn.Module):
        def forward(self, x):
            return x

    class ChannelAttention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    with pytest.raises(UnsupportedModel, match="ShiftedWindowAttentionV2 at 1 ties channels"):
        refuse_unsupported(nn.Sequential(nn.Conv2d(3, 8, 3), ShiftedWindowAttentionV2()))
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), ChannelAttention(16),
                        nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    assert discover(net, torch.zeros(1, 3, 16, 16))
