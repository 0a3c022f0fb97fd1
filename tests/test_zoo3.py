"""The causes the third held-out timm sweep (docs/results/heldout2.md) found, each with a test:
GroupNorm (timm.resnet50_gn), anti-aliased downsampling that records its channel count
(timm.resnetblur18), ReXNet's partial residual as one line naming the slice (timm.rexnetr_100),
and GCNet's attention pooling (timm.gcresnet33ts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy_prune.nodes import UnsupportedModel, discover
from deploy_prune.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


class _TinyGN(nn.Module):
    """conv 3->8 -> GroupNorm(4 groups of 2) -> ReLU -> conv 8->6 -> pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.gn1(self.conv1(x)))).mean((2, 3)))


def test_group_norm_node_loses_whole_groups_and_equals_the_base_without_them():
    """Before: torch-pruning narrowed the GroupNorm but kept its 32 groups, so the cut model did
    not run ('Expected number of channels in input to be divisible by num_groups', resnet50_gn).
    Now the node loses whole GroupNorm groups: the kept groups hold the same channels, so the
    cut model equals the base whose next conv ignores the cut channels."""
    torch.manual_seed(0)
    model = _TinyGN().eval()
    with torch.no_grad():
        model.gn1.weight.uniform_(0.5, 1.5)
        model.gn1.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 12, 12)
    nodes = {n.name: n for n in discover(model, x)}
    assert nodes["conv1"].groups == 4 and nodes["conv1"].tie == "conv1" and nodes["conv1"].prunable
    kept = [0, 1, 4, 5]  # GroupNorm groups 0 and 2
    oracle = _TinyGN().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        oracle.conv2.weight[:, [2, 3, 6, 7]] = 0
        want = oracle(x)
    apply_plan(model, {"conv1": kept}, x)
    assert (model.gn1.num_groups, model.gn1.num_channels, model.conv2.in_channels) == (2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_group_norm_plan_must_keep_whole_groups():
    from deploy_prune.surgery import PlanError

    model = _TinyGN().eval()
    with pytest.raises(PlanError, match="whole blocks of 2"):
        apply_plan(model, {"conv1": [0, 2, 4, 6]}, torch.randn(1, 3, 12, 12))


class _TinyBlur(nn.Module):
    """conv 3->16 -> BN -> ReLU -> timm's BlurPool2d(16) -> conv 16->8 -> pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BlurPool2d

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.blur = BlurPool2d(16, filt_size=3, stride=2)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.blur(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3)))


def test_blur_pool_follows_the_cut():
    """Before: BlurPool2d kept channels=16 and its (16, 1, 3, 3) filter, so the cut model did
    not run ('expected input ... to have 64 channels', resnetblur18). Its rows are one filter,
    so it narrows to the channels it receives and equals the base without the cut channels."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TinyBlur().eval()
    x = torch.randn(2, 3, 16, 16)
    kept = list(range(0, 16, 2))
    oracle = _TinyBlur().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        oracle.conv2.weight[:, [i for i in range(16) if i not in kept]] = 0
        want = oracle(x)
    name = next(n.name for n in discover(model, x) if n.root == "conv1")
    apply_plan(model, {name: kept}, x)
    assert model.blur.channels == 8 and tuple(model.blur.filt.shape) == (8, 1, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_rexnet_partial_residual_is_one_line_naming_the_slice():
    """Before: 'a module keeps channel counts that the cut cannot update' (timm.rexnetr_100):
    true of no module there; the cause is the fixed slice x[:, :C] of the partial residual."""
    timm = pytest.importorskip("timm")
    from conftest import random_plan

    model = timm.create_model("rexnetr_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedModel) as e:
        nodes = discover(model, x)
        apply_plan(model, random_plan(nodes), x)
    msg = str(e.value)
    assert "\n" not in msg and "no longer runs at features." in msg
    assert "slices its channels at a fixed index (x[:, :" in msg and "partial residual" in msg


class _TinyGC(nn.Module):
    """conv 3->16 -> BN -> ReLU -> timm's GlobalContext(16) (attention pooling) -> conv 16->8 -> head."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import GlobalContext

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.gc = GlobalContext(16, rd_ratio=1 / 4)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.gc(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3)))


def test_global_context_attention_pooling_is_cut_with_its_block():
    """Before: the group through GlobalContext's (B, 1, C, HW) @ (B, 1, HW, 1) matmul never
    converged ('indices multiply past 500,000 ... as ECA's conv1d', gcresnet33ts). Traced as the
    mean it weighs, the block's channels are one node with the conv before it; the attention conv
    loses the same inputs, and the cut equals the base with those channels zeroed."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TinyGC().eval()
    with torch.no_grad():
        for p in model.gc.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 16, 16)
    nodes = discover(model, x)
    node = next(n for n in nodes if "conv1" in n.producers)
    assert node.prunable and "gc.mlp_scale.fc2" in node.producers
    drop = [1, 2, 5, 7, 8, 11, 12, 15]
    oracle = _TinyGC().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        oracle.bn1.weight[drop] = 0
        oracle.bn1.bias[drop] = 0
        want = oracle(x)
        assert (model(x) - want).abs().max() > 1e-3  # the dropped channels mattered
    apply_plan(model, {node.name: [i for i in range(16) if i not in drop]}, x)
    assert model.gc.conv_attn.in_channels == 8 and model.gc.mlp_scale.fc1.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
