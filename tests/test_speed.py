"""The slowdown guard: a slim model that is not faster than its base is a loud warning (and an
error under --require-speedup); the measurement is paired, so no absolute time is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_plan
from deploy_prune import speed
from deploy_prune.allocation import cut
from deploy_prune.artifacts import ModelPlan, load_model_dir, save_model_dir
from deploy_prune.config import RunConfig
from deploy_prune.models import build_model
from deploy_prune.nodes import discover


@pytest.fixture(scope="module")
def swapped():
    """A deliberately slower "slim": the full model, against a base cut to a fifth of its channels."""
    torch.manual_seed(0)
    full = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    full_plan = ModelPlan("small_vgg", 10, 1, 32)
    kept = random_plan(discover(full, full_plan.example()), frac=0.2)
    narrow = cut(full, kept, full_plan.example()).eval()
    narrow_plan = ModelPlan("small_vgg", 10, 1, 32, kept=kept)
    return narrow, narrow_plan, full, full_plan


def test_slower_slim_warns_with_cause_and_fails_a_requirement(swapped, capsys):
    base, base_plan, slim, slim_plan = swapped
    cfg = RunConfig()
    result = speed.speed_check(base, base_plan, slim, slim_plan, cfg)
    assert result is not None and "skipped" not in result, result
    assert result["speedup"] < 1.0 and result["high"] < 1.0 and not result["faster"]
    assert result["flops_reduction"] < 1.0  # the "slim" has more FLOPs
    assert result["efficiency"] == pytest.approx(result["speedup"] / result["flops_reduction"])
    err = capsys.readouterr().err
    assert "WARNING: the pruned model is SLOWER than its base" in err and "Likely cause" in err
    assert "fewer FLOPs were removed" in result["cause"]
    json.dumps(result)  # saved into plan.json / report.json
    cfg.speed_check.require_speedup = 1.0
    with pytest.raises(speed.SlowerThanRequired, match="--require-speedup 1"):
            speed.enforce(result, cfg, where="OUT")


@pytest.mark.slow
def test_faster_slim_passes_quietly(swapped, capsys):
    base, base_plan, slim, slim_plan = swapped
    cfg = RunConfig()
    cfg.speed_check.require_speedup = 1.0
    result = speed.speed_check(slim, slim_plan, base, base_plan, cfg)  # the right way round
    assert result["faster"] and result["low"] > 1.0 and "cause" not in result
    assert "WARNING" not in capsys.readouterr().err
    speed.enforce(result, cfg, where="OUT")


def test_guard_can_be_switched_off_and_a_requirement_then_fails(swapped):
    base, base_plan, slim, slim_plan = swapped
    cfg = RunConfig()
    cfg.speed_check.enabled = False
    assert speed.speed_check(base, base_plan, slim, slim_plan, cfg) is None
    assert speed.summary_line(None) == "speed check: off"
    cfg.speed_check.require_speedup = 1.5
    with pytest.raises(speed.SlowerThanRequired, match="not measured"):
        speed.enforce(None, cfg, where="OUT")


def test_likely_cause_names_odd_widths_and_depthwise():
    from torch import nn

    base = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, groups=32))
    slim = nn.Sequential(nn.Conv2d(3, 13, 1), nn.Conv2d(13, 13, 3, groups=13))
    cause = speed.likely_cause(base, slim, 2.0, 1.0, device="cuda")
    assert "not multiples of 8, the channel block" in cause and "(e.g. 0)" in cause
    assert "1 narrowed depthwise convs (e.g. 1)" in cause


def test_likely_cause_names_narrower_groups_not_whole_groups_cut():
    from torch import nn

    base = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, groups=4))
    whole = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, groups=2))  # 2 of 4 groups cut
    thin = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, groups=4))  # every group halved
    assert "grouped convs" not in speed.likely_cause(base, whole, 2.0, 1.0, device="cuda")
    assert "1 grouped convs have narrower groups (e.g. 1: 16 -> 8 channels per group)" in \
        speed.likely_cause(base, thin, 2.0, 1.0, device="cuda")


def test_prune_cli_records_the_check_and_exits_2_under_require_speedup(tmp_path, capsys):
    from deploy_prune.cli import main

    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    base = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 32), tmp_path / "base")
    common = [str(base), "--scorer", "l1", "--target-flops", "2", "threads=1"]
    out = tmp_path / "slim"
    code = main(["prune", *common, "--out", str(out), "--require-speedup", "1000"])
    captured = capsys.readouterr()
    assert code == 2
    assert "--require-speedup 1000" in captured.err and "Traceback" not in captured.err
    _, plan = load_model_dir(out)  # written before the verdict, for inspection
    check = plan.info["speed_check"]
    assert check["backend"] == "ort" and check["batch"] == 1 and check["clock"] == "cpu"
    assert "measured speedup" in captured.out
    assert main(["prune", *common, "--out", str(tmp_path / "off"), "--no-speed-check"]) == 0
    _, plan = load_model_dir(tmp_path / "off")
    rounding = plan.info["rounding"]
    assert "speed_check" not in plan.info and rounding["setting"] == "auto" and rounding["round_to"] > 1
    cut_widths = [w for n, w in plan.info["widths"].items() if w != plan.info["base_widths"][n]]
    assert cut_widths and all(w % rounding["round_to"] == 0 for w in cut_widths)
    assert "speed check: off" in capsys.readouterr().out
