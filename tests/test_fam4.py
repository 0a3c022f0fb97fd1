"""Two CNN families the earlier sweeps refused (issue 15), each with a test: ECA channel attention
(timm.ecaresnet26t, timm.ecaresnet50d_pruned)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy_prune.nodes import discover
from deploy_prune.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


class _TinyECA(nn.Module):
    """conv 3->16 -> BN -> ReLU -> timm's EcaModule / CecaModule (k=3) -> conv 16->8 -> head."""

    def __init__(self, circular: bool) -> None:
        super().__init__()
        from timm.layers import CecaModule, EcaModule

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.eca = (CecaModule if circular else EcaModule)(kernel_size=3)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.eca(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3)))


@pytest.mark.parametrize("circular", [False, True])
def test_eca_block_prunes_and_its_conv1d_runs_over_the_kept_channels(circular):
    """Before: refused ('layer1.0.se.conv is a 1-channel Conv1d run across the channel axis',
    ecaresnet26t). Traced as a per-channel gate, the block's channels are one node with the conv
    before it; after the cut its Conv1d (no parameter per channel) runs over the kept channels
    only, in eval and train mode: the output is the base's computed on those channels."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TinyECA(circular).eval()
    with torch.no_grad():
        model.eca.conv.weight.normal_(0, 1.0)
    x = torch.randn(2, 3, 16, 16)
    nodes = discover(model, x)
    node = next(n for n in nodes if "conv1" in n.producers)
    assert node.prunable and node.channels == 16
    kept = [0, 3, 4, 6, 9, 10, 13, 14]
    with torch.no_grad():  # the base, by hand, on the kept channels
        h = torch.relu(model.bn1(model.conv1(x)))[:, kept]
        y = h.mean((2, 3)).view(2, 1, -1)
        if circular:
            y = nn.functional.pad(y, (1, 1), mode="circular")
        h = h * torch.sigmoid(model.eca.conv(y)).view(2, -1, 1, 1)
        want = model.fc(nn.functional.conv2d(h, model.conv2.weight[:, kept], model.conv2.bias, padding=1).mean((2, 3)))
    apply_plan(model, {node.name: kept}, x)
    assert model.conv1.out_channels == 8 and model.conv2.in_channels == 8
    assert tuple(model.eca.conv.weight.shape) == (1, 1, 3)  # length-agnostic: unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.train()
        assert model(x).shape == (2, 10)
