"""bench compare: flags a fabricated regression, passes an identical rerun, exits 1 / 0."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench import table
from bench.compare import compare, format_comparison
from deploy_prune.cli import main


def _rows(speedups: dict[int, tuple[float, float, float]]) -> list[dict]:
    """A base and a slim row per batch; slim carries (speedup, ci_low, ci_high)."""
    rows = []
    for batch, (sp, lo, hi) in speedups.items():
        common = {"model": "small_vgg", "backend": "ort", "device": "cpu", "precision": "fp32",
                  "batch": batch, "status": "ok", "p50_ms": 1.0}
        rows.append({**common, "variant": "base", "flops_reduction": 1.0})
        rows.append({**common, "variant": "slim", "speedup": sp, "speedup_ci_low": lo,
                     "speedup_ci_high": hi, "flops_reduction": 3.0})
    return rows


MEASURED = {1: (2.00, 1.97, 2.03), 8: (2.60, 2.55, 2.66)}


def test_identical_rerun_passes() -> None:
    df = table.to_frame(_rows(MEASURED))
    result = compare(df, df, tolerance=0.05)
    assert result.passed
    assert [v.status for v in result.verdicts] == ["ok", "ok"]


def test_fabricated_regression_is_flagged() -> None:
    baseline = table.to_frame(_rows({1: (2.00, 1.97, 2.03), 8: (3.50, 3.40, 3.60)}))
    result = compare(table.to_frame(_rows(MEASURED)), baseline, tolerance=0.05)
    assert not result.passed
    (bad,) = result.failures
    assert bad.status == "regressed" and bad.key == ("small_vgg", "ort", "cpu", "fp32", 8)
    assert bad.threshold == pytest.approx(0.95 * 3.50)
    assert "REGRESSED" in format_comparison(result) and "'batch': 8" in format_comparison(result)


def test_tolerance_is_relative_to_the_baseline_speedup() -> None:
    # current CI high 2.03; baseline 2.10: threshold 1.995 at 5% passes, 2.079 at 1% fails
    baseline = table.to_frame(_rows({1: (2.10, 2.08, 2.12)}))
    current = table.to_frame(_rows({1: MEASURED[1]}))
    assert compare(current, baseline, tolerance=0.05).passed
    assert not compare(current, baseline, tolerance=0.01).passed


def test_a_different_slim_model_is_noted() -> None:
    baseline = table.to_frame([dict(r, plan_sha256="aaa") for r in _rows(MEASURED)])
    current = table.to_frame([dict(r, plan_sha256="bbb") for r in _rows(MEASURED)])
    result = compare(current, baseline)
    assert result.passed and not any(v.same_plan for v in result.verdicts)
    assert "plan differs" in format_comparison(result)
    assert all(v.same_plan for v in compare(baseline, baseline).verdicts)


def test_missing_or_failed_rows_fail() -> None:
    baseline = table.to_frame(_rows(MEASURED))
    current_rows = _rows({1: MEASURED[1]})
    result = compare(table.to_frame(current_rows), baseline)
    assert [v.status for v in result.failures] == ["missing"]
    broken = [dict(r, status="error") if r["batch"] == 1 else r for r in _rows(MEASURED)]
    assert [v.key[-1] for v in compare(table.to_frame(broken), baseline).failures] == [1]


def test_ambiguous_or_empty_tables_are_errors() -> None:
    df = table.to_frame(_rows(MEASURED))
    with pytest.raises(ValueError, match="two rows"):
        compare(pd.concat([df, df]), df)
    only_base = df[df["variant"] == "base"]
    with pytest.raises(ValueError, match="no slim row"):
        compare(df, only_base)
    with pytest.raises(ValueError, match="tolerance"):
        compare(df, df, tolerance=1.5)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cur = _write(tmp_path / "current.json", _rows(MEASURED))
    same = _write(tmp_path / "same.json", _rows(MEASURED))
    demanding = _write(tmp_path / "demanding.json", _rows({1: (2.5, 2.4, 2.6), 8: MEASURED[8]}))
    assert main(["bench", "compare", str(cur), "--baseline", str(same)]) == 0
    assert main(["bench", "compare", str(cur), "--baseline", str(demanding), "--tolerance", "0.05"]) == 1
    captured = capsys.readouterr()
    assert "REGRESSED: {'model': 'small_vgg', 'backend': 'ort'" in captured.out
    assert "1 of 2 rows failed" in captured.err


def test_cli_reads_csv_and_reports_bad_files(tmp_path: Path) -> None:
    csv = tmp_path / "current.csv"
    table.to_frame(_rows(MEASURED)).to_csv(csv, index=False)
    same = _write(tmp_path / "same.json", _rows(MEASURED))
    assert main(["bench", "compare", str(csv), "--baseline", str(same)]) == 0
    assert main(["bench", "compare", str(tmp_path / "nope.json"), "--baseline", str(same)]) == 2
    (tmp_path / "bad.json").write_text("{\"not\": \"a list\"}")
    assert main(["bench", "compare", str(tmp_path / "bad.json"), "--baseline", str(same)]) == 2


# --- reproduction check (--within-interval) and suite tables ------------------------------------


def test_within_interval_passes_inside_and_fails_outside_on_either_side() -> None:
    baseline = table.to_frame(_rows(MEASURED))  # b1 band [1.97, 2.03], b8 band [2.55, 2.66]
    inside = table.to_frame(_rows({1: (2.02, 1.99, 2.05), 8: (2.56, 2.50, 2.62)}))
    assert compare(inside, baseline, tolerance=0.0, mode="interval").passed
    # b1 above its band (a *faster* rerun is not a reproduction either), b8 below
    off = table.to_frame(_rows({1: (2.05, 2.00, 2.10), 8: (2.50, 2.45, 2.55)}))
    result = compare(off, baseline, tolerance=0.0, mode="interval")
    assert [(v.key[-1], v.status) for v in result.failures] == [(1, "outside"), (8, "outside")]
    text = format_comparison(result)
    assert "is above the baseline's band [1.970, 2.030] (+2.5% from 2.000)" in text
    assert "is below the baseline's band [2.550, 2.660]" in text
    assert "0 of 2 rows inside the baseline's interval" in text and "max 3.8%" in text
    # the regression gate would have passed both: the two modes ask different questions
    assert compare(off, baseline, tolerance=0.05).passed
    # tolerance widens the band on both sides: 2.05 <= 1.02 * 2.03 = 2.071, 2.50 >= 0.98 * 2.55 = 2.499
    assert compare(off, baseline, tolerance=0.02, mode="interval").passed
    assert not compare(off, baseline, tolerance=0.01, mode="interval").passed


def test_within_interval_needs_a_baseline_interval_and_counts_missing_rows() -> None:
    baseline = table.to_frame(_rows(MEASURED))
    result = compare(table.to_frame(_rows({1: MEASURED[1]})), baseline, tolerance=0.0, mode="interval")
    assert [v.status for v in result.verdicts] == ["ok", "missing"]
    assert "1 of 2 rows inside the baseline's interval, 1 missing" in format_comparison(result)
    no_ci = table.to_frame([dict(r, speedup_ci_low=None) for r in _rows(MEASURED)])
    with pytest.raises(ValueError, match="no speedup interval"):
        compare(baseline, no_ci, mode="interval")
    with pytest.raises(ValueError, match="mode"):
        compare(baseline, baseline, mode="sideways")


def _suite_rows(points: dict[tuple[str, int], float]) -> list[dict]:
    """Suite-table rows: one model, several operating points and roundings, same batch."""
    rows = []
    for (point, rounding), sp in points.items():
        rows += [dict(r, operating_point=point, rounding=rounding) for r in _rows({1: (sp, 0.99 * sp, 1.01 * sp)})]
    return rows


def test_suite_tables_match_on_operating_point_and_rounding() -> None:
    points = {("vgg16-OSPR-5x", 8): 3.2, ("vgg16-OSPR-5x", 32): 3.5, ("vgg16-OSPR-7x", 8): 4.0}
    baseline = table.to_frame(_suite_rows(points))
    result = compare(baseline, baseline, mode="interval")
    assert result.passed and len(result.verdicts) == 3
    assert result.key_columns[-2:] == ("operating_point", "rounding")
    slower = table.to_frame(_suite_rows({**points, ("vgg16-OSPR-5x", 32): 3.0}))
    (bad,) = compare(slower, baseline).failures  # only the rounding-32 row regressed
    assert bad.key[-2:] == ("vgg16-OSPR-5x", 32)
    # a CSV reads rounding back as a number; it still matches
    floaty = table.to_frame([dict(r, rounding=float(r["rounding"])) for r in _suite_rows(points)])
    assert compare(floaty, baseline).passed
    plain = table.to_frame(_rows({1: (3.2, 3.1, 3.3)}))
    with pytest.raises(ValueError, match="suite table.*no operating_point, rounding"):
        compare(plain, baseline)


def test_cli_within_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path / "base.json", _rows(MEASURED))
    rerun = _write(tmp_path / "rerun.json", _rows({1: (2.01, 1.98, 2.04), 8: (2.70, 2.65, 2.75)}))
    assert main(["bench", "compare", str(rerun), "--baseline", str(base)]) == 0  # no regression...
    assert main(["bench", "compare", str(rerun), "--baseline", str(base), "--within-interval"]) == 1
    captured = capsys.readouterr()  # ...but batch 8 did not reproduce
    assert "OUTSIDE: {'model': 'small_vgg'" in captured.out and "'batch': 8" in captured.out
    assert "1 of 2 rows inside" in captured.out and "1 of 2 rows failed" in captured.err
    assert main(["bench", "compare", str(rerun), "--baseline", str(base), "--within-interval",
                 "--tolerance", "0.02"]) == 0
    assert "all 2 rows inside the baseline's intervals" in capsys.readouterr().out
