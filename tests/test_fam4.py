"""Two CNN families the earlier sweeps refused (issue 15), each with a test: ECA channel attention
(timm.ecaresnet26t, timm.ecaresnet50d_pruned) and MixNet's mixed-kernel convs, a torch.split with
sizes kept in Python (timm.mixnet_s, mixnet_m, tf_mixnet_s)."""

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


class _TinyMix(nn.Module):
    """conv 3->12 -> BN -> depthwise MixedConv2d (k 3/5/7, pieces of 4) -> BN -> 1x1 MixedConv2d
    12->8 (pieces 6->4) -> BN, plus a residual through a second 1x1 MixedConv2d 8->8 -> head.
    The residual stream is two nodes (one per piece of the concat), as in MixNet's blocks."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import MixedConv2d

        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = MixedConv2d(12, 12, [3, 5, 7], padding="", depthwise=True)
        self.bn2 = nn.BatchNorm2d(12)
        self.pwl = MixedConv2d(12, 8, [1, 1])
        self.bn3 = nn.BatchNorm2d(8)
        self.pw = MixedConv2d(8, 8, [1, 1])
        self.bn4 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn3(self.pwl(torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.conv1(x))))))))
        return self.fc((x + self.bn4(self.pw(x))).mean((2, 3)))


def test_mixed_kernel_conv_prunes_by_the_same_positions_in_every_piece():
    """Before: every node through a MixedConv2d was kept whole ('its channels pass through a
    torch.split with fixed sizes', mixnet_s: 23 of 38 nodes, 1.03x at most). Now its pieces
    narrow together (groups = the lcm of the piece counts, so none is emptied), the cut sets the
    module's split sizes, and the cut model equals the base with those channels zeroed; the
    residual stream's second piece is cut in the second piece of the next split (torch-pruning
    listed the split's outputs in trace order, and cut the first piece's inputs instead)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TinyMix().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 16, 16)
    nodes = discover(model, x)
    assert all(n.prunable for n in nodes), [n.fixed for n in nodes if not n.prunable]
    mid = next(n for n in nodes if "conv1" in n.producers)
    assert mid.groups == 6 and not mid.tie  # 3 depthwise pieces of 4, 2 pointwise pieces of 6
    second = next(n for n in nodes if "pwl.1" in n.producers)
    assert second.channels == 4 and "pw.1" in second.producers  # the residual add ties them
    plan = {mid.name: [0, 2, 4, 6, 8, 10], second.name: [1, 3]}
    oracle = _TinyMix().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        for bn, drop in ((oracle.bn1, [1, 3, 5, 7, 9, 11]), (oracle.bn2, [1, 3, 5, 7, 9, 11]),
                         (oracle.bn3, [4, 6]), (oracle.bn4, [4, 6])):
            bn.weight[drop] = 0
            bn.bias[drop] = 0
        want = oracle(x)
        assert (model(x) - want).abs().max() > 1e-3  # the dropped channels mattered
    apply_plan(model, plan, x, nodes=nodes)
    assert model.dw.splits == [2, 2, 2] and model.pwl.splits == [3, 3] and model.pw.splits == [4, 2]
    assert [c.in_channels for c in model.pw.values()] == [4, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.train()
        assert model(x).shape == (2, 10)


def test_mixed_kernel_plan_must_keep_the_same_positions_in_every_piece():
    pytest.importorskip("timm")
    from deploy_prune.surgery import PlanError

    model = _TinyMix().eval()
    x = torch.randn(1, 3, 16, 16)
    mid = next(n for n in discover(model, x) if "conv1" in n.producers)
    with pytest.raises(PlanError, match="same positions"):
        apply_plan(model, {mid.name: [0, 1, 2, 3]}, x)  # would empty pieces 2 and 3 of the dw conv


def test_mixed_kernel_pieces_keep_multiples_of_8_channels_where_the_width_allows():
    """mixnet_s ran 0.93x its base at 2x fewer FLOPs with pieces of 71, 122, 153 channels, 1.41x
    with multiples of 8: a node through 3 pieces of 16 is cut by the same positions in 24 blocks
    of 2 (each piece keeps 8 or 16); narrower nodes fall back to fewer blocks, never blocks of 1.
    Pieces of unequal size meet the node in blocks of their bounds' gcd."""
    from deploy_prune.nodes import MIXED_PIECE_MULTIPLE, Node, _mixed_blocks

    assert MIXED_PIECE_MULTIPLE == 8
    mod = nn.Module()

    def node(c: int) -> Node:
        return Node(name="n", root="n", producers=("n",), gates=("n",), capture="n", capture_relu=True,
                    channels=c, order=0)

    def pieces(c: int, k: int) -> dict:
        return {mod: {j: set(range(j * c // k, (j + 1) * c // k)) for j in range(k)}}

    assert _mixed_blocks(node(48), pieces(48, 3), {mod: "m"}).groups == 24
    assert _mixed_blocks(node(720), pieces(720, 5), {mod: "m"}).groups == 40  # pieces of 144: 18 blocks of 8
    assert _mixed_blocks(node(12), pieces(12, 3), {mod: "m"}).groups == 6  # 2 blocks of 2 per piece
    assert _mixed_blocks(node(12), {mod: {0: set(range(12))}}, {mod: "m"}).groups == 1  # one piece: no constraint
    # mixnet_s blocks.4.0: a 1x1 piece of 240 meets depthwise pieces of 160 and 80 (kept whole before)
    assert _mixed_blocks(node(240), {mod: {0: set(range(160)), 1: set(range(160, 240))}}, {mod: "m"}).groups == 24
    bad = _mixed_blocks(node(12), {mod: {0: set(range(0, 12, 2)), 1: set(range(1, 12, 2))}}, {mod: "m"})
    assert not bad.prunable and "mixed-kernel conv m" in bad.fixed


class _TinyMixSE(nn.Module):
    """1x1 MixedConv2d 4->16 (pieces 2->8) -> BN -> depthwise MixedConv2d (k 3/5) -> BN -> SE over
    all 16 channels -> conv 16->8 -> head, as MixNet's blocks.2.1."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import MixedConv2d

        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pw = MixedConv2d(4, 16, [1, 1])
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = MixedConv2d(16, 16, [3, 5], padding="", depthwise=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.conv = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw(self.stem(x)))))))
        x = x * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.conv(x).mean((2, 3)))


def test_mixed_kernel_pieces_under_an_se_block_are_each_a_node():
    """torch-pruning grouped both pieces of the 1x1 MixedConv2d with the SE's expand conv, and the
    node was made from the first piece only: the second piece's channels (8-15) were in no node,
    never cut (mixnet_s: 16 convs, e.g. blocks.2.1.conv_pw.1). Now each piece is its node."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _TinyMixSE().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 12, 12)
    nodes = discover(model, x)
    assert {"pw.0", "pw.1", "dw.0", "dw.1"} <= {p for n in nodes for p in n.producers}
    second = next(n for n in nodes if "pw.1" in n.producers)
    assert second.prunable and second.channels == 8 and "dw.1" in second.producers
    oracle = _TinyMixSE().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        for bn in (oracle.bn1, oracle.bn2):
            bn.weight[[9, 11, 13, 15]] = 0
            bn.bias[[9, 11, 13, 15]] = 0
        want = oracle(x)
    apply_plan(model, {second.name: [0, 2, 4, 6]}, x, nodes=nodes)
    assert model.pw.splits == [2, 2] and model.dw.splits == [8, 4] and model.se_expand.out_channels == 12
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
