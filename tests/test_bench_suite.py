"""``bench suite``: config validation, and a tiny suite (small_vgg at 32x32, ORT batch 1) end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.studies.paper_claims.config import SuiteConfig, load_suite
from bench.studies.paper_claims.report import write_results
from bench.studies.paper_claims.suite import CUT_FOR_TIME, cached_unit, plan_units, run_suite
from bench.table import REQUIRED
from deploy_prune.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = """
input_size: 32
num_classes: 10
in_channels: 1
points:
  - {arch: small_vgg, flops_reduction: 2.0, source: OSPR}
timing: {warmup_iters: 2, min_time_s: 0.02, rounds: 3, min_samples: 3, min_per_round: 1, clock: cpu}
stages:
  - {name: cpu-ort-b1, backends: [ort], batches: [1], roundings: [8]}
  - {name: gpu-trt, backends: [tensorrt], devices: [cuda], precisions: [fp16, int8], roundings: [8]}
"""


def test_paper_claims_config_has_the_papers_points() -> None:
    cfg = load_suite(REPO / "configs" / "bench" / "paper_claims.yaml")
    got = sorted((p.arch, p.source, p.flops_reduction) for p in cfg.points)
    want = sorted([("vgg16", "OSPR", r) for r in (4.4, 5.0, 6.0, 7.0)] + [("vgg16", "RBP", 5.0)]
                  + [("resnet50", "OSPR", r) for r in (2.8, 3.0, 4.0, 5.0)] + [("resnet50", "RBP", 2.2)])
    assert got == want
    assert {r for s in cfg.stages for r in s.roundings} == {1, 8, 32}


@pytest.mark.parametrize("override, key", [
    ("bogus=1", "'bogus'"),
    ("timing.bogus=1", "'timing.bogus'"),
    ("threads=two", "threads"),
])
def test_bad_keys_are_errors_that_name_them(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_suite(REPO / "configs" / "bench" / "paper_claims.yaml", [override])


def test_bad_values_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"points\[0\]\.source"):
        load_suite(None, ["points=[{arch: vgg16, flops_reduction: 2.0, source: XYZ}]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stages\[0\]\.batch'"):
        load_suite(None, ["stages=[{name: a, batch: [1]}]"])


def _tiny(tmp_path: Path, *extra: str) -> SuiteConfig:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return load_suite(path, list(extra))


def test_tiny_suite_rows_have_every_column(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    df = run_suite(cfg, tmp_path / "out", build_workers=0)
    for col in (*REQUIRED, "rounding", "operating_point", "source", "width_source"):
        assert col in df.columns, col
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 and set(ok["variant"]) == {"base", "slim"}
    slim = ok[ok["variant"] == "slim"].iloc[0]
    assert slim["rounding"] == 8 and slim["width_source"] == "uniform" and slim["source"] == "OSPR"
    assert slim["speedup_ci_low"] <= slim["speedup"] <= slim["speedup_ci_high"]
    assert slim["flops_reduction"] == pytest.approx(2.0, rel=0.15)
    assert slim["efficiency"] == pytest.approx(slim["speedup"] / slim["flops_reduction"])
    skipped = df[df["status"] == "skipped"]
    assert set(skipped["precision"]) == {"fp16", "int8"} and skipped["error"].str.len().min() > 0

    # a rerun resumes from the cached units: the same rows, nothing timed again
    again = run_suite(cfg, tmp_path / "out", build_workers=0)
    pd.testing.assert_series_equal(again["timestamp"], df["timestamp"])
    # ... except units that timed nothing: a rerun on a machine with a GPU measures those
    cpu_unit, gpu_unit = plan_units(cfg)
    assert cached_unit(tmp_path / "out", cpu_unit) is not None and cached_unit(tmp_path / "out", gpu_unit) is None

    paths = write_results(df, tmp_path / "res", cfg=cfg, command="deploy-prune bench suite tiny.yaml --out x")
    assert [p.name for p in paths] == ["paper_claims.csv", "paper_claims.md", "paper_claims.png"]
    # the CSV holds measured comparisons only: every row a slim model with a speedup and its interval
    csv = pd.read_csv(paths[0])
    assert len(csv) == 1 and (csv["status"] == "ok").all() and (csv["variant"] == "slim").all()
    assert csv["speedup"].notna().all() and (csv["speedup_ci_low"] <= csv["speedup"]).all()
    assert (csv["speedup"] <= csv["speedup_ci_high"]).all()
    base = ok[ok["variant"] == "base"].iloc[0]
    assert csv.loc[0, "base_p50_ms"] == pytest.approx(base["p50_ms"])
    assert csv.loc[0, "base_flops"] / csv.loc[0, "flops"] == pytest.approx(csv.loc[0, "flops_reduction"])
    text = paths[1].read_text()
    assert "`tensorrt` cuda int8: **skipped**" in text  # what was not measured is on the page, with why
    assert "random weights" in text and "No GPU was available" in text and "uniform ratio" in text


def test_budget_cut_rows_say_so(tmp_path: Path) -> None:
    df = run_suite(_tiny(tmp_path, "budget_minutes=0"), tmp_path / "out", build_workers=0)
    cpu = df[df["device"] == "cpu"]
    assert len(cpu) == 2 and (cpu["error"] == CUT_FOR_TIME).all() and (cpu["status"] == "skipped").all()


def test_repeats_are_separate_passes_and_their_intervals_are_enveloped(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "repeats=2", "stages=[{name: cpu-ort-b1, backends: [ort], batches: [1], roundings: [8]}]")
    assert [u.repeat for u in plan_units(cfg)] == [0, 1] and plan_units(cfg)[1].key.endswith("-rep1")
    df = run_suite(cfg, tmp_path / "out", build_workers=0)
    slim = df[(df["status"] == "ok") & (df["variant"] == "slim")]
    assert sorted(slim["repeat"]) == [0, 1]  # two sessions, each a measurement of its own
    # each session is a unit of its own, timed and cached separately (timestamps have 1 s
    # resolution, so two fast sessions may share one; the files and the samples may not)
    assert len(list((tmp_path / "out" / "units").glob("*.csv"))) == 2
    assert slim["mean_ms"].nunique() == 2

    csv = pd.read_csv(write_results(df, tmp_path / "res", cfg=cfg, command="x")[0])
    assert len(csv) == 1 and csv.loc[0, "repeats"] == 2
    s = slim["speedup"].to_numpy()
    assert csv.loc[0, "speedup"] == pytest.approx(float((s[0] * s[1]) ** 0.5))
    assert csv.loc[0, "speedup_ci_low"] == pytest.approx(slim["speedup_ci_low"].min())
    assert csv.loc[0, "speedup_ci_high"] == pytest.approx(slim["speedup_ci_high"].max())
    assert csv.loc[0, "efficiency"] == pytest.approx(csv.loc[0, "speedup"] / csv.loc[0, "flops_reduction"])
    assert "2 independent sessions" in (tmp_path / "res" / "paper_claims.md").read_text()


def test_repeats_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeats"):
        _tiny(tmp_path, "repeats=0")


def test_suite_slim_models_come_from_the_cli_prune(tmp_path: Path) -> None:
    """The suite's slim directory is what ``pipeline.prune`` writes (config, base hash, versions),
    with uniform widths: the same fraction removed from every node but the last conv node."""
    from bench.studies.paper_claims.models import _base_model, _plan, ensure_slim, run_config
    from deploy_prune import pipeline
    from deploy_prune.artifacts import read_plan
    from deploy_prune.config import RunConfig, from_dict

    cfg = _tiny(tmp_path)
    point = cfg.points[0]
    plan = read_plan(ensure_slim(tmp_path, cfg, point, 8))
    info = plan.info
    base_plan = _plan(cfg, point.arch, None, {"weights": "random"})
    assert info["base_sha256"] == base_plan.digest() and info["versions"]["torch"]
    assert from_dict(RunConfig, info["config"]) == run_config(cfg, point, 8, "uniform")
    assert (info["operating_point"], info["rounding"], info["width_source"]) == (point.name, 8, "uniform")
    assert info["flops_reduction"] == pytest.approx(2.0, rel=0.25)
    # the same prune by hand, from the CLI's first_k scores: the same channels kept
    run_cfg = run_config(cfg, point, 8, "uniform")
    model = _base_model(cfg, point.arch)
    scores, _ = pipeline.scored(pipeline.score(model, base_plan, run_cfg, None, "cpu"), base_plan, source="x")
    last = info["crucial_nodes"]
    assert len(last) == 1  # no named crucial nodes: the last conv node only
    assert pipeline.prune(model, base_plan, run_cfg, scores, crucial=last).plan.kept == plan.kept
    for kept in plan.kept.values():  # first_k + uniform: each node keeps its first channels
        assert kept == list(range(len(kept)))
