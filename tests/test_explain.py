"""``bench explain``: node mapping on a net whose layer costs are known, reconciliation of the
totals, and the diagnosis of a deliberately odd width."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.explain import (
    CALL_ROW,
    GAP_ROW,
    ExplainConfig,
    Profile,
    build_rows,
    diagnose,
    explain,
    reconcile,
    round_width,
)
from bench.timing import TimingConfig
from deploy_prune.allocation import cut
from deploy_prune.artifacts import ModelPlan
from deploy_prune.nodes import discover

QUICK = TimingConfig(warmup_s=0.05, warmup_iters=2, min_time_s=0.3, rounds=4, min_samples=8,
                     min_per_round=2, clock="cpu")
SIZE = 48


class Known(nn.Module):
    """Three conv nodes: 16, 16 and 64 output channels (the last one 4x wider, the same input
    width as the second), then pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _pair(tmp_path, odd: int | None = None):
    from bench.explain import artifact_from

    torch.manual_seed(0)
    base = Known().eval()
    plan = ModelPlan("known", 10, 3, SIZE)
    example = plan.example()
    kept = {"features.3": list(range(odd))} if odd else {"features.3": list(range(16))}
    slim = cut(base, kept, example).eval()
    slim_plan = ModelPlan("known", 10, 3, SIZE, kept=kept)
    return (artifact_from(base, plan, "base", tmp_path / "base"),
            artifact_from(slim, slim_plan, "slim", tmp_path / "slim"))


def _cfg(backend: str, probe: str = "none") -> ExplainConfig:
    return ExplainConfig(backend=backend, calls=30, warmup=2, timing=QUICK, tolerance=0.15, probe=probe)


@pytest.fixture(scope="module")
def torch_odd(tmp_path_factory):
    """The known net against itself with features.3 cut to 13 channels (odd), torch eager."""
    tmp = tmp_path_factory.mktemp("explain-torch")
    return explain(None, None, tmp / "out", _cfg("torch", probe="combined"), artifacts=_pair(tmp, odd=13))


def _time(result, row: str, variant: str = "base") -> float:
    return next(r[f"time_{variant}_ms"] for r in result["rows"] if r["row"] == row)


def test_nodes_of_the_known_net():
    nodes = [n.name for n in discover(Known().eval(), torch.zeros(1, 3, SIZE, SIZE))]
    assert nodes == ["features.0", "features.3", "features.6"]


def test_torch_mapping_puts_the_wide_layer_first(torch_odd):
    # features.6 has 4x the output channels of features.3 on the same input: 4x its FLOPs
    rows = {r["row"]: r for r in torch_odd["rows"]}
    assert rows["features.6"]["flops_base"] == 4 * rows["features.3"]["flops_base"]
    assert {"features.0", "features.3", "features.6", "classifier", "pooling"} <= set(rows)
    wide = _time(torch_odd, "features.6")
    # more time than every other node (by a margin: its FLOPs are 4x and 8x theirs)
    assert wide > 1.25 * _time(torch_odd, "features.3"), torch_odd["rows"]
    assert wide > 1.25 * _time(torch_odd, "features.0"), torch_odd["rows"]
    # BN and ReLU are charged to their conv's node: no row of their own
    assert not any(r["row"].startswith("other: BatchNorm") or "ReLU" in r["row"] for r in torch_odd["rows"])


def test_columns_sum_to_the_measured_latency(torch_odd):
    m = torch_odd["measured"]
    for v in ("base", "slim"):
        total = sum(r[f"time_{v}_ms"] for r in torch_odd["rows"])
        assert total == pytest.approx(m[f"{v}_p50_ms"], rel=1e-9)
    assert sum(r["share_slim"] for r in torch_odd["rows"]) == pytest.approx(1.0, rel=1e-9)


def test_diagnosis_flags_the_odd_width(torch_odd):
    d = torch_odd["diagnosis"]
    odd = {o["node"]: o for o in d["odd_widths"]}
    assert list(odd) == ["features.3"]  # 16 and 64 are multiples of 8 and 16; 13 is neither
    assert odd["features.3"]["channels"] == 13
    assert odd["features.3"]["rounded"] == 16
    probe = d["rounding_probe"]
    assert probe["widths"] == {"features.3": 16}
    assert probe["speedup_over_slim"] > 0 and math.isfinite(probe["speedup_over_slim"])


def test_round_width():
    assert round_width(13, 8, 64) == 16
    assert round_width(11, 8, 64) == 8
    assert round_width(3, 8, 64) == 8  # never below one multiple
    assert round_width(13, 16, 14) == 14  # never above the base width


def _profile(rows: dict[str, float], plain: float) -> Profile:
    return Profile(rows=rows, kinds={r: "node" for r in rows}, inside_ms=sum(rows.values()),
                   call_ms=sum(rows.values()), calls=1, source="synthetic", plain_ms=plain,
                   pairs=[(sum(rows.values()), plain)])


def test_reconciliation_and_gap_row():
    measured = {"base": 12.0, "slim": 6.0}  # the paired p50: load drift x1.2 over the profiling pass
    profiles = {"base": _profile({"a": 6.0, "b": 3.0}, plain=10.0),  # 9 + 1 per call: reconciles
                "slim": _profile({"a": 2.0, "b": 1.0}, plain=5.0)}  # 3 + 1 of 5: 20% unprofiled
    flops = {"base": {"a": 400, "b": 100}, "slim": {"a": 100, "b": 100}}
    widths = {"base": {"a": 16, "b": 8}, "slim": {"a": 4, "b": 8}}
    rows = build_rows(profiles, measured, flops, {"base": 500, "slim": 200}, widths, ["a", "b"], per_call_ms=1.0)
    by = {r["row"]: r for r in rows}
    assert by["a"]["time_base_ms"] == pytest.approx(7.2)  # 6 ms x drift 1.2
    assert by[CALL_ROW]["time_slim_ms"] == pytest.approx(1.2)  # 1 ms x drift 6 / 5
    assert by[GAP_ROW]["time_base_ms"] == pytest.approx(0.0)
    assert by[GAP_ROW]["time_slim_ms"] == pytest.approx(6.0 - 1.2 * 4.0)
    for v in ("base", "slim"):
        assert sum(r[f"time_{v}_ms"] for r in rows) == pytest.approx(measured[v])
    assert by["a"]["flops_reduction"] == pytest.approx(4.0)
    assert by["a"]["time_reduction"] == pytest.approx(3.0)
    assert by["a"]["efficiency"] == pytest.approx(0.75)
    rec = reconcile(profiles, measured, 0.15, per_call_ms=1.0)
    assert rec["base"]["gap_fraction"] == pytest.approx(0.0)
    assert rec["slim"]["gap_fraction"] == pytest.approx(0.2)
    assert rec["reconciled"] is False
    assert reconcile(profiles, measured, 0.25, per_call_ms=1.0)["reconciled"] is True
    d = diagnose(rows, measured, {"base": 500, "slim": 200}, multiple=8, multiple_why="test", widths=widths,
                 prunable={"a": True, "b": True})
    assert [o["node"] for o in d["odd_widths"]] == ["a"]  # 4 channels: not a multiple of 8
    assert d["ceiling_speedup"] == pytest.approx(12.0 / 1.2)


def test_ort_mapping_and_reconciliation(tmp_path):
    pytest.importorskip("onnxruntime")
    result = explain(None, None, tmp_path / "out", _cfg("ort"), artifacts=_pair(tmp_path))
    rows = {r["row"]: r for r in result["rows"]}
    # fused Conv+BN+ReLU nodes of the optimized graph land on deploy-prune's nodes
    assert {"features.0", "features.3", "features.6"} <= set(rows)
    assert all(rows[n]["kind"] == "node" for n in ("features.0", "features.3", "features.6"))
    assert _time(result, "features.6") > 1.25 * _time(result, "features.3"), result["rows"]
    assert _time(result, "features.6") > 1.25 * _time(result, "features.0"), result["rows"]
    rec = result["reconciliation"]
    for v in ("base", "slim"):  # profiled rows + calibrated per-call overhead vs unprofiled calls
        assert abs(rec[v]["gap_fraction"]) <= 0.35, rec  # live, on a shared 2-core box: loose
    assert (tmp_path / "out" / "explain.csv").is_file() and (tmp_path / "out" / "report.md").is_file()
