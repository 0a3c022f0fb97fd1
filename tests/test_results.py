"""The committed results: every CSV row measured, and the README's tables generated from the CSV."""

from __future__ import annotations

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
