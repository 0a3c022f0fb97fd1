"""timm models as first-class architectures (``timm.NAME``): built, imported with their own
preprocessing, pruned, rebuilt from plan.json; a missing timm is one line saying how to install
it; and the generic causes the held-out timm sweep (docs/results/zoo.md) found, each with a test."""

from __future__ import annotations

import sys

import pytest
import torch

from deploy_prune.cli import main
from deploy_prune.config import DataConfig
from deploy_prune.models import build_model, get_spec

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread")  # timings and traces on one thread, as the matrix runs


def _weights(tmp_path, arch: str, *, in_channels: int = 3, num_classes: int = 10):
    src = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(src.state_dict(), path)
    return src, path


def test_timm_arch_builds_like_timm_itself(tmp_path):
    src, path = _weights(tmp_path, "resnet10t", in_channels=1)
    model = build_model("timm.resnet10t", num_classes=10, in_channels=1).eval()
    from deploy_prune.weights import load_weights

    load_weights(model, path, arch="timm.resnet10t")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    assert get_spec("timm.resnet10t").input_size == 176  # timm's pretrained_cfg input size
    assert get_spec("timm.resnet18.a1_in1k")  # a pretrained tag names the same architecture


@pytest.mark.parametrize("arch,expect", [
    ("timm.resnet10x", "did you mean timm.resnet10t"),
    ("resnet26d", "did you mean timm.resnet26d"),  # the prefix left out
    ("mobilenet_v2", "did you mean tv.mobilenet_v2"),  # torchvision still first for its names
])
def test_unknown_names_suggest_the_zoo_name(tmp_path, capsys, arch, expect):
    _, path = _weights(tmp_path, "resnet10t")
    code = main(["import", "--arch", arch, "--weights", str(path), "--data", "digits", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert expect in err[0]


def test_missing_timm_is_one_line_saying_pip_install(tmp_path, capsys, monkeypatch):
    _, path = _weights(tmp_path, "resnet10t")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError, as without timm
    with pytest.raises(ImportError):
        import timm as _  # noqa: F401
    out = tmp_path / "b"
    code = main(["import", "--arch", "timm.resnet10t", "--weights", str(path), "--data", "digits", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert "pip install timm" in err[0] and "timm.resnet10t" in err[0]
    assert not out.exists()
    # torchvision and registered names do not need timm, and the listing simply leaves timm out
    assert build_model("tv.resnet18", num_classes=3, in_channels=3) is not None
    from deploy_prune.models import arch_names

    assert not any(n.startswith("timm.") for n in arch_names())
    from bench.families import check_one

    row = check_one("timm.resnet10t")
    assert row["status"] == "refused" and "pip install timm" in row["detail"]


def test_import_defaults_come_from_the_pretrained_cfg():
    from deploy_prune.pipeline import import_overrides

    over = import_overrides("timm.inception_v3", DataConfig(image_size=64))  # mean/std 0.5, crop 0.875
    assert "data.mean=[0.5, 0.5, 0.5]" in over and "data.std=[0.5, 0.5, 0.5]" in over
    assert "data.resize=73" in over and "data.interpolation=bicubic" in over
    imnet = import_overrides("timm.resnet10t", DataConfig())  # ImageNet's mean/std, 176 px, crop 0.875
    assert "data.mean=[0.485, 0.456, 0.406]" in imnet and "data.image_size=176" in imnet
    assert "data.resize=201" in imnet
    own = import_overrides("timm.resnet10t", DataConfig(image_size=32, resize=40, mean=[0.1], std=[0.2],
                                                       interpolation="nearest"))
    assert not any(o.startswith(("data.resize", "data.mean", "data.interpolation")) for o in own)


def test_import_prune_and_rebuild_from_plan(tmp_path, capsys):
    """import --arch timm.X, prune it, and both directories rebuild from plan.json alone."""
    from bench.families import prune_one
    from deploy_prune.artifacts import load_model_dir, save_model_dir

    _, path = _weights(tmp_path, "resnet10t")
    base = tmp_path / "base"
    assert main(["import", "--arch", "timm.resnet10t", "--weights", str(path), "--data", "digits",
                 "--input-size", "32", "--out", str(base)]) == 0, capsys.readouterr().err
    model, plan = load_model_dir(base)
    assert plan.arch == "timm.resnet10t" and plan.info["preprocess"]["interpolation"] == "bicubic"

    base_model, base_plan, res = prune_one("timm.resnet10t", size=32)
    assert res.plan.info["flops_reduction"] == pytest.approx(2.0, rel=0.05)
    save_model_dir(res.slim, res.plan, tmp_path / "slim")
    again, plan2 = load_model_dir(tmp_path / "slim")
    x = torch.randn(2, 3, 32, 32)
    res.slim.eval()
    torch.testing.assert_close(again.eval()(x), res.slim(x), rtol=0, atol=0)
    assert plan2.arch == "timm.resnet10t" and plan2.kept == res.plan.kept


class _TinyEca(torch.nn.Module):
    """conv -> BN -> ECA (mean -> view (B, 1, C) -> 1-channel conv1d -> view -> sigmoid gate) -> head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.eca = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.eca(x.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1)
        return self.fc((x * y.sigmoid()).mean((2, 3)))


def test_eca_channel_attention_is_refused_in_one_line():
    """Before: at 16 channels the cut produced a conv with 0 filters (the tracer mapped the
    channel view wrongly); at 2048 (timm.ecaresnet26t) discovery did not finish in 300 s."""
    from deploy_prune.nodes import UnsupportedModel, discover

    with pytest.raises(UnsupportedModel) as e:
        discover(_TinyEca().eval(), torch.randn(1, 3, 16, 16))
    msg = str(e.value)
    assert "\n" not in msg and "eca" in msg and "ECA" in msg and "channel axis" in msg


def test_a_dependency_group_that_does_not_converge_is_refused_in_seconds():
    """timm.rexnet_100 (x[:, :C] + shortcut next to a concat) hung in torch-pruning's group
    fixed point for > 300 s; bounded, it is one line naming the op and where."""
    import time

    from conftest import random_plan
    from deploy_prune.nodes import UnsupportedModel, discover
    from deploy_prune.surgery import apply_plan

    model = timm.create_model("rexnet_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedModel) as e:  # since concat sizes come from the trace, the groups
        nodes = discover(model, x)  # may converge; the cut then cannot update the slice-add
        apply_plan(model, random_plan(nodes), x)
    assert time.perf_counter() - t0 < 60  # the bound is in entries, not seconds: ~2 s alone
    msg = str(e.value)
    assert "\n" not in msg and ("ReXNet" in msg or "RexNet" in msg)
    assert "channel slice after features." in msg or "after the cut it no longer runs at features." in msg


def test_concat_producers_map_onto_the_node_channels():
    """GhostNet's node = primary conv + its depthwise cheap op, concatenated (and a later
    depthwise conv over the concat): the L1 scorer crashed on the width mismatch. Each producer's
    outputs now map onto the root's channels; zero gates equal the cut exactly."""
    import numpy as np

    from deploy_prune.gates import ChannelGates
    from deploy_prune.nodes import discover
    from deploy_prune.scoring import SCORERS, ScoreContext
    from deploy_prune.surgery import apply_plan

    torch.manual_seed(0)
    model = timm.create_model("ghostnet_050", pretrained=False, num_classes=10).eval()
    for m in model.modules():  # non-trivial BN, so a gate that misses a path shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    nodes = discover(model, x[:1])
    mapped = [n for n in nodes if n.maps]
    modules = dict(model.named_modules())
    assert mapped and all(len(n.maps) == len(n.producers) == len(n.gates) for n in mapped)
    assert all(len(mp) == modules[p].out_channels for n in mapped for p, mp in zip(n.producers, n.maps))
    assert all(max(max(mp) for mp in n.maps) == n.channels - 1 for n in mapped)
    scores = SCORERS.get("l1")().score(ScoreContext(model=model, nodes=nodes, example=x[:1]))
    assert all(np.asarray(scores[n.name]).shape == (n.channels,) for n in nodes)
    rng = np.random.default_rng(0)
    plan = {n.name: sorted(rng.choice(n.channels, max(1, n.channels // 2), replace=False).tolist())
            for n in mapped}
    masks = {n.name: torch.zeros(n.channels).index_fill_(0, torch.tensor(plan[n.name]), 1.0)
             if n.name in plan else torch.ones(n.channels) for n in nodes}
    with torch.no_grad(), ChannelGates(model, nodes, masks.__getitem__):
        gated = model(x)
    with torch.no_grad():
        cut = apply_plan(model, plan, x[:1])(x)
    torch.testing.assert_close(gated, cut, rtol=1e-4, atol=1e-4)


class _Split(torch.nn.Module):
    """conv -> torch.split(x, [4, 4]) -> a 3x3 and a 5x5 conv -> concat (MixNet's mixed kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.k3 = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.k5 = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)
        self.head_conv = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        a, b = torch.split(torch.relu(self.bn(self.stem(x))), [4, 4], dim=1)
        x = torch.relu(self.head_conv(torch.cat([self.k3(a), self.k5(b)], 1)))
        return self.fc(x.mean((2, 3)))


def test_channels_through_a_fixed_size_split_are_kept_whole_and_named():
    """MixNet/Res2Net keep torch.split sizes in Python: cutting those channels left a model that
    no longer ran (split_with_sizes ... got [8, 8]) or crashed the scorer. They are kept whole,
    a plan that narrows them is refused, and an out-of-reach target names the cause."""
    from deploy_prune.nodes import discover, kept_whole
    from deploy_prune.surgery import PlanError, apply_plan

    model = _Split().eval()
    x = torch.randn(1, 3, 16, 16)
    nodes = {n.name: n for n in discover(model, x)}
    assert not nodes["stem"].prunable and "torch.split" in nodes["stem"].fixed
    assert nodes["head_conv"].prunable
    assert kept_whole(list(nodes.values())).startswith("1 of 2 nodes are kept whole: 1 because its "
                                                       "channels pass through a torch.split")
    with pytest.raises(PlanError, match="torch.split"):
        apply_plan(model, {"stem": [0, 1, 2, 3]}, x)
    apply_plan(model, {"head_conv": list(range(8))}, x)
    assert model(x).shape == (1, 10)


def test_families_rows_tell_refusals_from_errors(monkeypatch):
    """Only the pruner's own refusals are 'refused'; a crash (it was a numpy ValueError in the
    L1 scorer) propagates to the child, which records an error row."""
    import bench.families as fam

    assert fam.check_one("timm.not_a_model")["status"] == "refused"

    def crash(*a, **k):
        raise ValueError("operands could not be broadcast together with shapes (8,) (4,)")

    monkeypatch.setattr(fam, "prune_one", crash)
    with pytest.raises(ValueError, match="broadcast"):
        fam.check_one("timm.resnet10t")


def test_conv_subclass_per_channel_parameters_are_cut_too():
    """timm's NF-ResNet convs (ScaledStdConv2d) carry a per-filter gain that torch-pruning does
    not know: the cut model failed with 'weight should contain 8 elements not 64'. The gain is
    now cut with its filters: the kept filters give the base's outputs exactly. (A consumer's
    weight standardisation over fewer inputs changes, so zero gates do not equal the cut here.)"""
    import copy

    from timm.layers import ScaledStdConv2d

    from deploy_prune.surgery import apply_plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(ScaledStdConv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                ScaledStdConv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    with torch.no_grad():
        model[0].gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    kept = [0, 2, 5, 7]
    cut = apply_plan(copy.deepcopy(model), {"0": kept}, x[:1])
    assert cut[0].gain.shape == (4, 1, 1, 1) and cut[2].weight.shape[1] == 4
    with torch.no_grad():
        torch.testing.assert_close(cut[0](x), model[0](x)[:, kept], rtol=1e-6, atol=1e-6)
        assert cut(x).shape == (2, 10)


class _Fixed(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 8, -1).mean(-1)  # 8: a channel count kept in Python (runs at 4: 4*196 = 8*98)


def test_a_cut_model_that_no_longer_runs_or_has_an_empty_layer_is_one_line(monkeypatch):
    from deploy_prune import nodes as nodes_mod
    from deploy_prune.nodes import UnsupportedModel
    from deploy_prune.surgery import apply_plan

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), _Fixed(),
                                torch.nn.Linear(8, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(UnsupportedModel, match="no longer runs at 4 ") as e:
        apply_plan(model, {"0": [0, 1, 2, 3]}, x)
    assert "\n" not in str(e.value)
    # the ECA mapping bug (before it was refused up front) cut a conv to 0 filters: named, not run
    monkeypatch.setattr(nodes_mod, "refuse_unsupported", lambda model: None)
    with pytest.raises(UnsupportedModel, match=r"left conv\d with no channels"):
        apply_plan(_TinyEca().eval(), {"conv1": list(range(8)), "conv2": list(range(8))}, torch.randn(1, 3, 16, 16))


def test_families_takes_any_arch_name_and_renders_a_named_page(tmp_path):
    import csv

    from bench.families import FIELDS, arch_of, main, models, render

    assert arch_of("resnet18") == "tv.resnet18" and arch_of("timm.resnet10t") == "timm.resnet10t"
    assert arch_of("resnet20") == "resnet20" and arch_of("tv.vgg11") == "tv.vgg11"
    assert "timm.resnet10t" not in models()  # the matrix stays torchvision's
    rows = [{"model": "timm.a", "status": "ok", "input": "3x64", "nodes": 3, "prunable": 3, "flops_asked": 2,
             "flops_got": 2, "parity_max_abs_diff": 0, "speedup": 1.6, "speedup_low": 1.5, "speedup_high": 1.7,
             "efficiency": 0.8, "detail": ""},
            {"model": "timm.b", "status": "refused", "input": "3x64", "detail": "cannot prune B: why"}]
    path = tmp_path / "families.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    page = render(path, tmp_path / "out", "CMD", name="zoo", title="Held-out", expected=["timm.a", "timm.b", "timm.c"])
    text = page.read_text()
    assert page.name == "zoo.md" and (tmp_path / "out" / "zoo.csv").is_file()
    assert text.startswith("# Held-out") and "1 not reached before the run's deadline: timm.c" in text
    assert "Median efficiency 0.80" in text and "cannot prune B: why" in text
    assert main(["list", "--zoo", "timm", "--pattern", "resnet10t"]) == 0


@pytest.mark.parametrize("arch", ["cs3darknet_s", "cspresnet50"])
def test_csp_concat_of_a_split_traces_and_gates_exactly_like_the_cut(arch):
    """CSPNet concatenates a split's halves: torch-pruning could not infer the split's channel
    counts (TypeError: 'int' + 'NoneType'), so cs3darknet was refused; the sizes are now taken
    from the trace. timm's BatchNormAct2d normalises functionally inside the module, so the gate
    fell on the conv (a zeroed channel came out as BN's shift); it now falls on the norm module,
    and zeroing a node's channels is the same model as cutting them."""
    import copy

    from conftest import random_plan
    from deploy_prune.gates import ChannelGates
    from deploy_prune.nodes import discover
    from deploy_prune.surgery import apply_plan

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    for m in model.modules():  # non-trivial BN, so a gate before the norm shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    nodes = discover(model, x[:1])
    modules = dict(model.named_modules())
    assert all(isinstance(modules[g], torch.nn.BatchNorm2d) for n in nodes for g in n.gates)
    plan = random_plan(nodes, seed=1)
    assert plan
    masks = {n.name: torch.zeros(n.channels).index_fill_(0, torch.tensor(plan[n.name]), 1.0)
             if n.name in plan else torch.ones(n.channels) for n in nodes}
    with torch.no_grad(), ChannelGates(model, nodes, masks.__getitem__):
        gated = model(x)
    with torch.no_grad():
        cut = apply_plan(copy.deepcopy(model), plan, x[:1])(x)
    torch.testing.assert_close(cut, gated, rtol=1e-4, atol=1e-5)
