"""The committed results: every CSV row measured, and the README's tables generated from the CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.studies.paper_claims.readme import BEGIN, END, block, current_block

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
POINTS = [("vgg16", "OSPR", r) for r in (4.4, 5, 6, 7)] + [("vgg16", "RBP", 5)] + \
    [("resnet50", "OSPR", r) for r in (2.8, 3, 4, 5)] + [("resnet50", "RBP", 2.2)]


def test_paper_claims_csv_rows_are_all_measured() -> None:
    csv = pd.read_csv(RESULTS / "paper_claims.csv")
    assert len(csv) > 0
    assert (csv["status"] == "ok").all() and (csv["variant"] == "slim").all()
    for col in ("speedup", "speedup_ci_low", "speedup_ci_high", "flops_reduction", "efficiency", "rounding",
                "base_p50_ms", "p50_ms"):
        assert csv[col].notna().all(), col
    assert ((csv["speedup_ci_low"] <= csv["speedup"]) & (csv["speedup"] <= csv["speedup_ci_high"])).all()
    # the papers' ten operating points at each width rounding, except those the page names as
    # out of reach (rounding 32 keeps at least 32 channels per node: ResNet-50 cannot reach 5x)
    page = (RESULTS / "paper_claims.md").read_text()
    for rounding in (1, 8, 32):
        measured = set(csv.loc[csv["rounding"] == rounding, "operating_point"])
        missing = {f"{a}-{s}-{r:g}x" for a, s, r in POINTS} - measured
        for point in missing:
            assert f"{point} r{rounding}" in page and "out of reach" in page, (point, rounding)
        assert len(missing) <= 1, (rounding, missing)
    assert (RESULTS / "paper_claims.png").is_file()


def test_readme_tables_are_generated_from_the_csv() -> None:
    readme = (REPO / "README.md").read_text()
    got = current_block(readme)
    assert got is not None, f"README.md has no {BEGIN} ... {END} block"
    assert got == block(pd.read_csv(RESULTS / "paper_claims.csv")), (
        "README's paper-claims tables differ from docs/results/paper_claims.csv: "
        "run `python -m bench.studies.paper_claims.readme`")


def test_block_marks_a_missing_batch() -> None:
    row = dict(model="vgg16", source="OSPR", target_flops_reduction=5.0, flops_reduction=5.02, device="cpu",
               threads=1, backend="ort", precision="fp32", rounding=8, speedup=3.1, speedup_ci_low=3.0,
               speedup_ci_high=3.2, efficiency=0.62)
    df = pd.DataFrame([{**row, "batch": 1}, {**row, "backend": "torch", "batch": 8, "speedup": 2.0}])
    text = block(df)
    assert "| VGG-16 | OSPR | 5x | 5.02x | CPU, 1 thread | ONNX Runtime | fp32 | 3.10x [3.00, 3.20] | 0.62 | - | - |" \
        in text
    assert "| PyTorch eager | fp32 | - | - | 2.00x [3.00, 3.20] | 0.62 |" in text


def _default_pair() -> pd.DataFrame:
    csv = pd.read_csv(RESULTS / "fashion_accuracy.csv")
    return csv[csv["model"] == "default"].set_index(["backend", "batch"])


def test_readme_main_pair_figures_come_from_the_committed_csv() -> None:
    """Sections 2 and 4 quote one measurement of the main job's pair: fashion_accuracy.csv."""
    readme = (REPO / "README.md").read_text()
    pair = _default_pair()
    ci = {k: f"{r.speedup:.2f}x [{r.speedup_ci_low:.2f}, {r.speedup_ci_high:.2f}]" for k, r in pair.iterrows()}
    for (backend, batch), r in pair.iterrows():  # section 2's table, row by row
        name = {"torch": "torch eager", "ort": "ONNX Runtime"}[backend]
        row = (f"| {name} | {batch} | {r.base_p50_ms:.3f} -> {r.slim_p50_ms:.3f} ms | {ci[backend, batch]} | "
               f"{r.flops_reduction:.2f}x | {r.efficiency:.2f} |")
        assert row in readme, row
    base, slim = pair["run_base_top1"].iloc[0], pair["run_slim_top1"].iloc[0]
    row4 = (f"| small VGG (`configs/default.yaml`) | {pair['flops_reduction'].iloc[0]:.2f}x | {base:.2f}% -> "
            f"{slim:.2f}% | {ci['ort', 1]} | {ci['ort', 8]} | {ci['torch', 1]} | {ci['torch', 8]} |")
    assert row4 in readme, row4  # section 4 gives the same figures
    assert f"| baseline | {base:.2f}% |" in readme and f"**{slim:.2f}%**" in readme  # section 1


def test_readme_cut_accuracy_is_the_ablation_csvs() -> None:
    readme = (REPO / "README.md").read_text()
    csv = pd.read_csv(RESULTS / "ablation.csv").set_index(["study", "variant"])["pruned_top1"]
    assert f"The beta-selected cut is at {csv['loss', 'kl']:.2f}% before recovery" in readme
    for variant, label in [("random", "random"), ("first_k", "first-k"), ("l1", "L1")]:
        assert f"{label} {csv['selection', variant]:.2f}%" in readme, variant
    assert f"RBP {csv['scorer', 'rbp']:.2f}%" in readme


def test_readme_main_job_is_the_committed_report() -> None:
    """Section 1 quotes the main job's report.json (docs/results/main_job_report.json)."""
    readme = (REPO / "README.md").read_text()
    r = json.loads((RESULTS / "main_job_report.json").read_text())
    assert f"| cut, no recovery (`pruned.top1`) | {r['pruned']['top1']:.2f}% | {r['pruned']['top5']:.2f}% |" in readme
    assert f"| after one-step recovery (`recovered.top1`) | {r['recovered']['top1']:.2f}% |" in readme
    assert f"**{r['slim']['top1']:.2f}%** (-{r['base']['top1'] - r['slim']['top1']:.2f})" in readme
    assert f"**{r['flops_reduction']:.2f}x fewer**" in readme
    assert ("top-1 base {:.2f}% | pruned {:.2f}% | recovered {:.2f}% | slim {:.2f}%".format(
        r["base"]["top1"], r["pruned"]["top1"], r["recovered"]["top1"], r["slim"]["top1"])) in readme


