"""The README's paper-claims tables, generated from ``docs/results/paper_claims.csv``.

The README summarises the suite in two tables: per operating point, device, backend and batch
(rounding 8), and the rounding study (ORT, batch 1). Both are written between
``<!-- paper_claims:begin -->`` and ``<!-- paper_claims:end -->`` by::

    python -m bench.studies.paper_claims.readme --csv docs/results/paper_claims.csv --readme README.md

and ``tests/test_results.py`` checks that the README's block is exactly what the committed CSV
gives, so the README cannot drift from the measurements.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from deploy_prune.artifacts import atomic_write_text

BEGIN, END = "<!-- paper_claims:begin -->", "<!-- paper_claims:end -->"
MODEL_NAMES = {"vgg16": "VGG-16", "resnet50": "ResNet-50"}
BACKEND_NAMES = {"ort": "ONNX Runtime", "torch": "PyTorch eager", "compile": "torch.compile",
                 "aoti": "AOTInductor", "tensorrt": "TensorRT", "ort-trt": "ORT TensorRT EP"}
HEADLINE_ROUNDING = 8


def _target(x: float) -> str:
    return f"{x:g}x"


def _speedup(r: pd.Series) -> str:
    return f"{r['speedup']:.2f}x [{r['speedup_ci_low']:.2f}, {r['speedup_ci_high']:.2f}]"


def _device(r: pd.Series) -> str:
    if r["device"] == "cpu":
        n = int(r["threads"]) if pd.notna(r.get("threads")) else None
        return f"CPU, {n} thread{'s' if n != 1 else ''}" if n else "CPU"
    return str(r.get("gpu_name") or r["device"])


def _point_order(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["model", "source", "target_flops_reduction"], ascending=[False, True, True])


def headline_table(csv: pd.DataFrame, device: str) -> str:
    """Rounding-8 rows of one device: a line per point x backend x precision, a column pair per batch."""
    d = csv[(csv["device"] == device) & (csv["rounding"] == HEADLINE_ROUNDING)]
    if d.empty:
        return ""
    batches = sorted(int(b) for b in d["batch"].unique())
    head = ["model", "paper", "target", "FLOPs reduction", "device", "backend", "precision"]
    for b in batches:
        head += [f"batch {b}: speedup [95% CI]", "eff."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    keys = ["model", "source", "target_flops_reduction", "backend", "precision"]
    for _, g in _point_order(d).groupby(keys, sort=False, dropna=False):  # in the sorted rows' order
        first = g.iloc[0]
        cells = [MODEL_NAMES.get(first["model"], first["model"]), first["source"],
                 _target(first["target_flops_reduction"]), f"{first['flops_reduction']:.2f}x", _device(first),
                 BACKEND_NAMES.get(first["backend"], first["backend"]), first["precision"]]
        for b in batches:
            row = g[g["batch"] == b]
            cells += [_speedup(row.iloc[0]), f"{row.iloc[0]['efficiency']:.2f}"] if len(row) else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rounding_table(csv: pd.DataFrame, backend: str = "ort", device: str = "cpu", batch: int = 1) -> str:
    """FLOPs reduction and speedup of each point at every measured rounding (one backend/batch)."""
    d = csv[(csv["backend"] == backend) & (csv["device"] == device) & (csv["batch"] == batch)]
    if d["rounding"].nunique() < 2:
        return ""
    roundings = sorted(int(r) for r in d["rounding"].unique())
    head = ["model", "paper", "target"] + [f"rounding {r}: FLOPs red. / speedup [95% CI]" for r in roundings]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    keys = ["model", "source", "target_flops_reduction"]
    for _, g in _point_order(d).groupby(keys, sort=False, dropna=False):  # in the sorted rows' order
        first = g.iloc[0]
        cells = [MODEL_NAMES.get(first["model"], first["model"]), first["source"],
                 _target(first["target_flops_reduction"])]
        for r in roundings:
            row = g[g["rounding"] == r]
            cells.append(f"{row.iloc[0]['flops_reduction']:.2f}x / {_speedup(row.iloc[0])}" if len(row) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def block(csv: pd.DataFrame) -> str:
    """The whole generated README block, markers included."""
    parts = [BEGIN]
    for device in sorted(csv["device"].unique()):
        t = headline_table(csv, device)
        if t:
            parts += [f"Widths rounded to {HEADLINE_ROUNDING} channels, {device.upper()}:", "", t, ""]
    rt = rounding_table(csv)
    if rt:
        parts += ["Width rounding (ONNX Runtime, CPU, batch 1): rounding changes both the FLOPs and the time.",
                  "", rt, ""]
    parts.append(END)
    return "\n".join(parts)


def current_block(readme: str) -> str | None:
    m = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), readme, flags=re.S)
    return m.group(0) if m else None


def update(readme_path: Path, csv_path: Path) -> bool:
    """Rewrite the README's block from the CSV; True if it changed."""
    text = readme_path.read_text()
    old = current_block(text)
    if old is None:
        raise SystemExit(f"{readme_path}: no '{BEGIN}' ... '{END}' block to fill")
    new = block(pd.read_csv(csv_path))
    if new == old:
        return False
    atomic_write_text(readme_path, text.replace(old, new))
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the README's paper-claims tables from the suite's CSV.")
    p.add_argument("--csv", type=Path, default=Path("docs/results/paper_claims.csv"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args(argv)
    for path in (args.csv, args.readme):
        if not path.is_file():
            raise SystemExit(f"no such file: {path}")
    changed = update(args.readme, args.csv)
    print(f"{args.readme}: {'updated' if changed else 'already matches'} {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
