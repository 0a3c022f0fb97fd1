"""Shared fixtures: tiny real data (scikit-learn digits) and quick model directories."""

from __future__ import annotations

import random

import pytest
import torch

from deploy_prune.artifacts import ModelPlan, save_model_dir
from deploy_prune.config import RunConfig, from_dict
from deploy_prune.models import build_model
from deploy_prune.nodes import discover
from deploy_prune.surgery import apply_plan

# Small models on 2 cores run several times faster on one thread (no oversubscription).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def digits_cfg(**over) -> RunConfig:
    """A run config on sklearn digits (8x8, 1 channel) with tiny budgets."""
    base = {
        "data": {"name": "digits", "batch_size": 64},
        "model": {"arch": "small_vgg"},
        "train": {"epochs": 3, "lr": 0.05},
        "scoring": {"l1_lambda": 0.001, "lr": 0.01, "epochs": 1},
        "recovery": {"epochs": 1, "lr": 0.001},
        "finetune": {"epochs": 1, "lr": 0.001},
        "threads": 2,
        "speed_check": {"enabled": False},  # tests/test_speed.py covers the guard
    }
    for k, v in over.items():
        section, key = k.split("__")
        base.setdefault(section, {})[key] = v
    return from_dict(RunConfig, base)


def random_plan(nodes, *, frac: float = 0.5, seed: int = 0) -> dict[str, list[int]]:
    """Random kept channels per prunable node; a node tied to a grouped conv keeps the same
    random positions in every group (the only cut that keeps the groups), or, when its unit is
    tied (``Node.tie``), the same random whole groups as the other nodes of its unit."""
    rng = random.Random(seed)
    plan, unit_groups = {}, {}
    whole = {n.tie for n in nodes if n.tie and not n.prunable}  # a unit with a fixed node stays whole
    for n in nodes:
        if not n.prunable or n.tie in whole:
            continue
        width = n.channels // n.groups
        if n.tie:
            kept = unit_groups.setdefault(n.tie, rng.sample(range(n.groups), max(1, int(n.groups * frac))))
            plan[n.name] = sorted(g * width + j for g in kept for j in range(width))
            continue
        pos = rng.sample(range(width), max(1, int(width * frac)))
        plan[n.name] = sorted(p + b * width for b in range(n.groups) for p in pos)
    return plan


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (the family matrix's setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_vgg_dir(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    return save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28), tmp_path / "base")


@pytest.fixture
def example_nodes():
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    return model, x, discover(model, x)


def half_width_pair(root) -> tuple:
    """small_vgg (random weights) and a copy keeping the first half of every node's channels,
    saved as model directories under ``root``: the bench tests' base/slim pair."""
    torch.manual_seed(0)
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    plan = ModelPlan("small_vgg", 10, 1, 28, kept=None)
    base = save_model_dir(model, plan, root / "base")
    example = plan.example(2)
    kept = {n.name: list(range(n.channels // 2)) for n in discover(model, example) if n.prunable}
    apply_plan(model, kept, example)
    slim = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28, kept=kept), root / "slim")
    return base, slim
