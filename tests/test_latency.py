"""Latency-targeted allocation: the knapsack against brute force, the budget guarantee, refusal
of foreign tables, and a table measured end to end on a tiny model with ONNX Runtime."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from bench.latency import probe as probe_mod
from bench.latency.latency_table import (
    LatencyTable,
    StaleTableError,
    cached_table,
    grid_widths,
    load_table,
    table_key,
)
from bench.latency.solver import Option, importance_options, solve
from deploy_prune.allocation import PLUGIN_TARGETS, load_allocator
from deploy_prune.config import AllocationConfig


def brute_force(options: dict[str, list[Option]], capacity: float) -> float:
    """Best value over every selection whose summed cost fits ``capacity`` (-inf if none)."""
    best = -np.inf
    for combo in itertools.product(*options.values()):
        if sum(o.cost for o in combo) <= capacity + 1e-9:
            best = max(best, sum(o.value for o in combo))
    return best


def random_options(rng: np.random.Generator, *, groups: int = 3, per: int = 4,
                   integer: bool = False) -> dict[str, list[Option]]:
    out = {}
    for g in range(groups):
        cost = rng.integers(-20, 5, per).astype(float) if integer else rng.uniform(-1.0, 0.2, per)
        out[f"n{g}"] = [Option(width=j + 1, cost=float(c), value=float(v))
                        for j, (c, v) in enumerate(zip(cost, rng.uniform(0, 10, per)))]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_solver_matches_brute_force_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    options = random_options(rng, integer=True)
    capacity = float(rng.integers(-40, 5))
    sol = solve(options, capacity, resolution=1.0)
    best = brute_force(options, capacity)
    if not np.isfinite(best):
        assert sol is None
    else:
        assert sol is not None
        assert sol.value == pytest.approx(best)
        assert sol.cost <= capacity + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_solver_on_float_costs_is_feasible_and_near_optimal(seed):
    rng = np.random.default_rng(100 + seed)
    options = random_options(rng, groups=4)
    floor = sum(min(o.cost for o in opts) for opts in options.values())
    capacity = floor + rng.uniform(0.05, 1.5)
    bins = 500
    sol = solve(options, capacity, bins=bins)
    assert sol is not None
    assert sol.cost <= capacity + 1e-12  # costs are rounded up: never over the budget
    step = (capacity - floor) / bins  # rounding up loses at most one bin per node
    assert sol.value >= brute_force(options, capacity - len(options) * step) - 1e-9
    assert sol.value <= brute_force(options, capacity) + 1e-9


def synthetic_table(rng: np.random.Generator) -> LatencyTable:
    widths = {"a": [2, 4, 8], "b": [4, 8, 16, 32], "c": [8, 16]}
    ms = {n: sorted(rng.uniform(0.3, 1.0, len(w)).tolist()) for n, w in widths.items()}
    for n in ms:
        ms[n][-1] = 1.0  # full width: the base latency
    return LatencyTable(key={}, base_ms=1.0, widths=widths, ms=ms)


@pytest.mark.parametrize("seed", range(10))
def test_prediction_never_exceeds_budget(seed):
    from bench.latency.allocator import solve_table

    rng = np.random.default_rng(seed)
    table = synthetic_table(rng)
    scores = {n: rng.uniform(0, 1, max(w)) for n, w in table.widths.items()}
    floor = table.predict({n: w[0] for n, w in table.widths.items()})
    for budget in np.linspace(floor, 1.2, 25):
        sol = solve_table(table, scores, float(budget))
        assert sol is not None
        assert table.predict(sol.widths) <= budget + 1e-12
    assert solve_table(table, scores, floor - 1e-3) is None  # below every selection: infeasible


def test_importance_is_sum_of_top_k_scores():
    opts = importance_options(np.array([0.1, 0.9, 0.5, 0.3]), [1, 2, 4], [0.0, 0.0, 0.0])
    assert [o.value for o in opts] == pytest.approx([0.9, 1.4, 1.8])


def test_grid_honours_floor_rounding_and_count():
    cfg = AllocationConfig(grid=4, round_to=8, min_fraction=0.1)
    widths = grid_widths(64, cfg)
    assert widths[0] == 8 and widths[-1] == 64 and len(widths) == 4
    assert all(w % 8 == 0 for w in widths)
    assert grid_widths(5, AllocationConfig(grid=8, min_channels=2, min_fraction=0.0, round_to=1)) == [2, 3, 4, 5]


KEY = {"backend": "ort", "device": "cpu", "device_name": "Some CPU", "precision": "fp32", "batch": 1,
       "threads": 1, "clock": "cpu", "versions": {"torch": "2.15.0", "onnxruntime": "1.31.1"},
       "base_sha256": "ab" * 32, "nodes": ["a"], "grid": 8, "round_to": 1, "min_channels": 1,
       "min_fraction": 0.05}


@pytest.mark.parametrize("field,value", [("device_name", "Other GPU"), ("backend", "tensorrt"),
                                         ("base_sha256", "cd" * 32),
                                         ("versions", {"torch": "2.11.0", "onnxruntime": "1.31.1"})])
def test_foreign_table_is_refused(tmp_path, field, value):
    table = LatencyTable(key={**KEY, field: value}, base_ms=1.0, widths={"a": [1, 2]}, ms={"a": [0.5, 1.0]})
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table.to_json()))
    with pytest.raises(StaleTableError, match=field):
        load_table(path, KEY)
    assert load_table(path, {**KEY, field: value}).ms == {"a": [0.5, 1.0]}


def test_plugin_targets_resolve_through_entry_points():
    for target in PLUGIN_TARGETS:
        assert callable(load_allocator(target).allocate)


@pytest.fixture
def tiny_probe(tmp_path, monkeypatch):
    """A probe of a digits-size small_vgg (1x8x8) on CPU ONNX Runtime with a short timing budget."""
    from bench.timing import TimingConfig
    from deploy_prune.artifacts import ModelPlan
    from deploy_prune.models import build_model

    quick = TimingConfig(warmup_s=0.05, warmup_iters=3, min_time_s=0.1, rounds=4, min_samples=12,
                         min_per_round=3)
    monkeypatch.setattr(probe_mod, "CHECK", quick)
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    plan = ModelPlan("small_vgg", 10, 1, 8)
    with probe_mod.Probe(model, plan, backend="ort", device="cpu", precision="fp32", batch=1,
                         workdir=tmp_path / "work") as probe:
        yield probe


def test_table_build_end_to_end_and_cache(tiny_probe, tmp_path, monkeypatch, example_nodes):
    _, _, nodes = example_nodes
    prunable = [n for n in nodes if n.name in ("features.3", "features.7")]
    cfg = AllocationConfig(grid=2, min_fraction=0.25, round_to=8)
    monkeypatch.setenv("DEPLOY_PRUNE_CACHE", str(tmp_path / "cache"))
    table = cached_table(tiny_probe, prunable, cfg)
    assert table.widths == {"features.3": [8, 32], "features.7": [16, 64]}
    assert table.base_ms > 0 and all(t > 0 for ms in table.ms.values() for t in ms)
    assert table.ms["features.3"][-1] == table.base_ms  # full width is the base itself
    again = cached_table(tiny_probe, prunable, cfg)  # from the cache file: same numbers
    assert again.ms == table.ms and again.created == table.created
    assert table.key == table_key(tiny_probe, prunable, cfg)


@pytest.mark.slow
def test_allocator_meets_a_measured_speedup_on_a_tiny_model(tmp_path, monkeypatch, example_nodes):
    """The closed loop on a 28x28 small_vgg: the final measured speedup is within tolerance."""
    from deploy_prune.artifacts import ModelPlan

    model, example, nodes = example_nodes
    monkeypatch.setenv("DEPLOY_PRUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    scores = {n.name: rng.uniform(0, 1, n.channels) for n in nodes}
    cfg = AllocationConfig(target="speedup", speedup=1.5, grid=4, tolerance=0.05, round_to=8)
    alloc = load_allocator("speedup").allocate(model, nodes, scores, example, crucial=["features.18"],
                                                cfg=cfg, plan=ModelPlan("small_vgg", 10, 1, 28))
    lat = alloc.extra["latency"]
    assert lat["measured_speedup"] == pytest.approx(1.5, rel=0.05)
    assert alloc.counts["features.18"] == 128  # crucial: whole


def test_report_gains_latency_fields_only_for_latency_targets():
    from deploy_prune.run import latency_fields

    assert latency_fields({"flops": 1}) == {}
    lat = {"base_ms": 0.2, "predicted_ms": 0.09, "measured_ms": 0.1, "measured_speedup": 2.0,
           "rounds": [{"budget_ms": 0.1}]}
    out = latency_fields({"latency": lat})["latency"]
    assert out == {"base_ms": 0.2, "predicted_ms": 0.09, "measured_ms": 0.1, "measured_speedup": 2.0}
