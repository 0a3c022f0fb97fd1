"""The family matrix: every torchvision classifier prunes at 2x (or, for transformers and
channel-shuffle nets, is refused with one line naming the cause), runs in eval and train mode,
exports to ONNX with parity and gives one bench row. A few fast models run in CI; the rest are
``slow`` (docs/results/families.md has the whole matrix, made by ``python -m bench.families``)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from bench.families import check_one
from bench.timing import TimingConfig

FAST = {"mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5", "vit_b_32"}
TRANSFORMERS = ("vit_", "swin_", "maxvit_")
REFUSED = {"shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"}
TINY = TimingConfig(warmup_s=0.0, warmup_iters=2, min_time_s=0.05, rounds=2, min_samples=4, min_per_round=2,
                    clock="cpu")
ALL = torchvision.models.list_models(module=torchvision.models)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ALL])
def test_family_prunes_exports_and_times_or_is_refused_in_one_line(name):
    row = check_one(name, timing=TINY, size=None if name in ("inception_v3",) else 64)
    if name.startswith(TRANSFORMERS):
        assert row["status"] == "refused" and "transformer" in row["detail"] and "\n" not in row["detail"]
        return
    if name in REFUSED:
        assert row["status"] == "refused" and "channel shuffle" in row["detail"] and "\n" not in row["detail"]
        return
    assert row["status"] == "ok", row
    assert row["prunable"] > 0
    assert abs(row["flops_got"] / 2.0 - 1) <= 0.05, row  # the 2x target, within 5%
    assert row["parity"] == "pass"
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("speedup", "speedup_low", "speedup_high"))
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]


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
