"""The real-accuracy companion of the suite: top-1 of base and slim next to measured speedups.

Joins, per trained Fashion-MNIST pair, the ``deploy-prune bench --accuracy`` table (top-1 of the
artifact actually timed, on each backend) with the run's own report (``report.json``: top-1 in
PyTorch, FLOPs reduction). Written as ``fashion_accuracy.csv`` and ``fashion_accuracy.md``::

    deploy-prune bench fashion-accuracy --entry default /tmp/p7/acc/default /tmp/dp/default configs/default.yaml \\
        --notes NOTES.md --out docs/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench import table
from bench.report import markdown_table
from bench.studies.fashion_accuracy import DESCRIPTION, add_arguments
from deploy_prune.artifacts import atomic_write_text, read_json_object

COLUMNS = [
    ("model", "model", ""), ("config", "config", ""), ("backend", "backend", ""), ("batch", "batch", ""),
    ("flops_reduction", "FLOPs reduction", ".2f"), ("base_top1", "base top-1 %", ".2f"),
    ("slim_top1", "slim top-1 %", ".2f"), ("top1_samples", "eval images", ""),
    ("base_p50_ms", "base p50 ms", ".3f"), ("slim_p50_ms", "slim p50 ms", ".3f"),
    ("speedup_ci", "speedup [95% CI]", ""), ("efficiency", "efficiency", ".2f"),
    ("threads", "threads", ""), ("clock", "clock", ""),
]


def entry_rows(label: str, bench_dir: Path, run_dir: Path, config: str) -> pd.DataFrame:
    """One row per backend x batch of one pair: bench figures plus the run's PyTorch top-1."""
    df = table.read(bench_dir / "results.json")
    ok = df[df["status"] == "ok"]
    key = ["backend", "device", "precision", "batch"]
    base = ok[ok["variant"] == "base"][[*key, "p50_ms", "top1"]].rename(
        columns={"p50_ms": "base_p50_ms", "top1": "base_top1"})
    slim = ok[ok["variant"] == "slim"].rename(columns={"p50_ms": "slim_p50_ms", "top1": "slim_top1"})
    out = slim.merge(base, on=key, how="left")
    report = read_json_object(run_dir / "report.json")
    out["model"], out["config"], out["run_dir"] = label, config, str(run_dir)
    out["run_base_top1"] = report["base"]["top1"]
    out["run_slim_top1"] = report["slim"]["top1"]
    out["speedup_ci"] = [f"{r.speedup:.2f} [{r.speedup_ci_low:.2f}, {r.speedup_ci_high:.2f}]"
                         for r in out.itertuples()]
    return out


def page(df: pd.DataFrame, notes: str) -> str:
    """The Markdown page: the joined table, then the notes (commands, budgets)."""
    runs = df.drop_duplicates("model")[["model", "config", "run_base_top1", "run_slim_top1"]]
    run_cols = [("model", "model", ""), ("config", "config", ""), ("run_base_top1", "base top-1 % (run)", ".2f"),
                ("run_slim_top1", "slim top-1 % (run)", ".2f")]
    return "\n".join([
        "# Fashion-MNIST: accuracy next to measured speedup", "",
        "Top-1 is measured on the artifact that was timed (same backend, `deploy-prune bench --accuracy`), "
        "on the Fashion-MNIST test split; speedups are paired base/slim ratios over interleaved rounds with "
        "95% bootstrap intervals (CPU, clock and threads per row).", "",
        markdown_table(df, COLUMNS), "",
        "Top-1 as the training run reported it (PyTorch, `report.json`):", "",
        markdown_table(runs, run_cols), "", notes.strip(), "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(p)
    return write_page(p.parse_args(argv))


def write_page(args: argparse.Namespace) -> int:
    """The page for parsed options (``deploy-prune bench fashion-accuracy`` or ``main``)."""
    df = pd.concat([entry_rows(lbl, Path(b), Path(r), c) for lbl, b, r, c in args.entry], ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "fashion_accuracy.csv", df.to_csv(index=False))
    atomic_write_text(args.out / "fashion_accuracy.md", page(df, args.notes.read_text() if args.notes else ""))
    print(f"{len(df)} rows -> {args.out / 'fashion_accuracy.csv'}, {args.out / 'fashion_accuracy.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
