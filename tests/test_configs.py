"""Every shipped config loads, names a registered model, and its crucial nodes exist."""

from pathlib import Path

import pytest
import torch

from deploy_prune.config import load_config
from deploy_prune.models import MODELS, build_model
from deploy_prune.nodes import discover

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load_config(path)
    MODELS.get(cfg.model.arch)
    if cfg.crucial.nodes:
        side = 64 if cfg.data.name == "imagefolder" else 32
        model = build_model(cfg.model.arch, num_classes=10, in_channels=3)
        names = {n.name for n in discover(model, torch.zeros(1, 3, side, side))}
        assert set(cfg.crucial.nodes) <= names, set(cfg.crucial.nodes) - names
