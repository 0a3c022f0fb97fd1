"""MLP heads: the hidden units of a classifier made of Linears on flattened features (VGG,
AlexNet) are prunable ``flat`` nodes; the output layer is not; flat nodes are never crucial
nor mimicked; a Linear squeeze-excitation's gate couples to its conv's channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deploy_prune.allocation import AllocationError, allocate, cut, select_crucial
from deploy_prune.config import AllocationConfig
from deploy_prune.gates import ChannelGates
from deploy_prune.nodes import discover, last_node
from deploy_prune.recovery.losses import MIMIC_LOSSES
from deploy_prune.recovery.mimic import RecoveryError, check_mimic_set, classifier_modules


class MLPHead(nn.Module):
    """Two convs, then a VGG-like head: Linear -> BN1d -> ReLU -> Dropout -> Linear -> ReLU -> Linear
    (the BatchNorm1d, as in the CIFAR VGG-16's head, must carry the gate: a unit zeroed before it
    is BN's shift, not zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(96, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 7))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class LinearSE(nn.Module):
    """Squeeze-excitation written with Linears on (B, C): fc2's outputs gate conv1's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        y = y * s[:, :, None, None]
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _gated_equals_cut(model: nn.Module, x: torch.Tensor, plan: dict[str, list[int]]) -> None:
    nodes = discover(model, x[:1])
    masks = {n.name: torch.zeros(n.channels).index_fill_(0, torch.tensor(plan[n.name]), 1.0)
             if n.name in plan else torch.ones(n.channels) for n in nodes}
    with torch.no_grad(), ChannelGates(model, nodes, masks.__getitem__):
        gated = model(x)
    with torch.no_grad():
        slim = cut(model, plan, x[:1], nodes=nodes).eval()
        got = slim(x)
    torch.testing.assert_close(got, gated, rtol=1e-4, atol=1e-5)


def test_mlp_head_hidden_units_are_flat_nodes_and_the_output_layer_is_not():
    torch.manual_seed(0)
    model = MLPHead().eval()
    x = torch.randn(3, 3, 16, 16)
    nodes = discover(model, x[:1])
    flat = {n.name: n.channels for n in nodes if n.flat}
    assert flat == {"classifier.0": 40, "classifier.4": 32}
    assert "classifier.6" not in {n.name for n in nodes}  # the 7 class outputs are never a node
    assert last_node(nodes).name == "features.4"  # the last *conv* node, not a head layer
    _randomise_bn(model)
    _gated_equals_cut(model, x, {"classifier.0": list(range(0, 40, 3)), "classifier.4": [1, 5, 8, 30],
                                 "features.0": list(range(8))})
    slim = cut(model, {"classifier.0": list(range(10))}, x[:1])
    assert slim.classifier[0].out_features == 10 and slim.classifier[4].in_features == 10
    assert slim(x).shape == (3, 7)


def test_flat_nodes_are_never_crucial_nor_mimicked_and_cut_head_layers_train_in_recovery():
    model = MLPHead().eval()
    x = torch.randn(1, 3, 16, 16)
    nodes = discover(model, x)
    scores = {n.name: np.full(n.channels, 10.0 if n.flat else 1.0) for n in nodes}  # flat would win
    crucial = select_crucial(nodes, scores, n=2)
    assert crucial and not any(c.startswith("classifier") for c in crucial)
    with pytest.raises(AllocationError, match="classifier head"):
        select_crucial(nodes, scores, names=["classifier.0", "features.4"])
    with pytest.raises(RecoveryError, match="classifier head"):
        check_mimic_set(MIMIC_LOSSES.get("mse")(), ["classifier.4"], nodes)
    slim = cut(model, {"classifier.4": list(range(16))}, x)
    frozen = classifier_modules(slim, model)
    assert slim.classifier[0] in frozen and slim.classifier[1] in frozen  # left whole: frozen (OSPR)
    assert slim.classifier[4] not in frozen and slim.classifier[6] not in frozen  # lost units / inputs: train


def test_global_allocation_narrows_an_mlp_head():
    torch.manual_seed(0)
    model = MLPHead().eval()
    x = torch.randn(1, 3, 16, 16)
    nodes = discover(model, x)
    rng = np.random.default_rng(1)  # the head's units score lowest: the ranking takes them first
    scores = {n.name: rng.random(n.channels) * (0.01 if n.flat else 1.0) for n in nodes}
    alloc = allocate(model, nodes, scores, x, crucial=[last_node(nodes).name],
                     cfg=AllocationConfig(flops_reduction=1.3, round_to=1))
    assert alloc.flops_reduction > 1.2  # a conv channel here is ~5% of the FLOPs: near, not within 3%
    assert cut(model, alloc.plan, x)(x).shape == (1, 7)
    assert {"classifier.0", "classifier.4"} & set(alloc.plan)


def test_linear_squeeze_excitation_couples_its_gate_to_the_conv_channels():
    """Before, every Linear on (B, F) was ignored as a head, and torch-pruning then skipped the
    conv node whose group held fc2's outputs: conv1 was never pruned."""
    torch.manual_seed(0)
    model = LinearSE().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 12, 12)
    nodes = discover(model, x[:1])
    by_name = {n.name: n for n in nodes}
    assert "conv1" in by_name and set(by_name["conv1"].producers) == {"conv1", "fc2"}
    assert by_name["fc1"].flat and "head" not in by_name
    _gated_equals_cut(model, x, {"conv1": [0, 2, 3, 7, 9, 15], "fc1": [1, 2, 6]})


def test_explain_reads_the_width_of_a_head_node():
    """``bench explain`` read every node's width from its root's out_channels (a Linear has none)."""
    from bench.explain import node_widths

    model = MLPHead().eval()
    x = torch.randn(1, 3, 16, 16)
    nodes = discover(model, x)
    slim = cut(model, {"classifier.0": list(range(16)), "features.0": list(range(8))}, x, nodes=nodes)
    widths = node_widths(slim, nodes)
    assert widths["classifier.0"] == 16 and widths["features.0"] == 8 and widths["classifier.4"] == 32


def test_a_model_that_does_not_run_on_the_input_says_so_not_that_it_cannot_be_traced():
    """Inception-v4 at 64x64 was 'cannot trace the channel dependencies' (its kernels outgrow the
    maps): the one line now says the input is too small for the model."""
    from deploy_prune.nodes import UnsupportedModel

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 7)).eval()
    with pytest.raises(UnsupportedModel, match=r"does not run on an input of shape \(1, 3, 6, 6\)") as e:
        discover(model, torch.randn(1, 3, 6, 6))
    assert "\n" not in str(e.value) and "input size" in str(e.value)
    assert discover(model, torch.randn(1, 3, 16, 16))  # a size it accepts traces
