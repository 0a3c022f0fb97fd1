"""The suite's results: ``paper_claims.csv``, ``paper_claims.md`` and ``paper_claims.png``.

All three come from the same tidy table (one row per model variant x backend x device x
precision x batch x rounding x operating point). ``paper_claims.csv`` holds the *measured*
comparisons only: one row per slim model timed against its base, in the bench table's columns
plus the suite's (``rounding``, ``operating_point``...) and the base's own latency as
``base_*`` columns, so every row carries a measured speedup and its interval. What was not
measured (GPU stages on a CPU box, units cut for time) is listed on the page with its reason;
the full table with those rows stays in the work directory (``suite_table.csv``). The page leads
with one line per operating point (the ``summary`` rows: rounding 8 when measured, else the
best-measured rounding), then every measured slim row, then what was skipped and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import table
from bench.report import markdown_table
from bench.studies.paper_claims.config import SuiteConfig
from deploy_prune.artifacts import atomic_write_text

BASE_COLUMNS = ("p50_ms", "p90_ms", "mean_ms", "throughput_ips", "flops", "params")
SUITE_COLUMNS = ("rounding", "operating_point", "source", "target_flops_reduction", "width_source", "stage",
                 "repeats", "speedup_repeats")
ROW_COLUMNS = [
    ("operating_point", "operating point", ""), ("source", "paper", ""), ("rounding", "rounding", ""),
    ("stage", "stage", ""), ("backend", "backend", ""), ("device", "device", ""),
    ("precision", "precision", ""), ("batch", "batch", ""),
    ("flops_reduction", "FLOPs reduction", ".2f"), ("base_p50_ms", "base p50 ms", ".2f"),
    ("p50_ms", "slim p50 ms", ".2f"), ("speedup_ci", "speedup [95% CI]", ""),
    ("efficiency", "efficiency", ".2f"), ("threads", "threads", ""), ("clock", "clock", ""),
]
DEVICE_SPEEDUP_COLUMN = ("device_speedup_ci", "device speedup [95% CI]", "")
# what tells two measured rows of one operating point apart: the summary keeps one per key
SUMMARY_KEY = ["operating_point", "stage", "backend", "device", "precision", "batch"]


def row_columns(s: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The page's row columns; on CUDA the device-only speedup goes beside the end-to-end one."""
    if "device_speedup_ci" not in s or not (s["device_speedup_ci"] != "-").any():
        return list(ROW_COLUMNS)
    i = [c for c, _, _ in ROW_COLUMNS].index("speedup_ci") + 1
    return [*ROW_COLUMNS[:i], DEVICE_SPEEDUP_COLUMN, *ROW_COLUMNS[i:]]


UNIT_KEY = ["operating_point", "rounding", "stage", "backend", "device", "precision", "batch", "variant"]
LATENCY_COLUMNS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips", "device_p50_ms", "device_mean_ms")


def _combine_ratio(g: pd.DataFrame, row: dict[str, Any], col: str) -> None:
    """Geometric mean of the repeats' ratio ``col``; interval = envelope of their intervals."""
    vals = g[col].dropna()
    if not len(vals):
        return
    row[col] = float(np.exp(np.log(vals.to_numpy(float)).mean()))
    row[f"{col}_ci_low"] = float(g[f"{col}_ci_low"].min())
    row[f"{col}_ci_high"] = float(g[f"{col}_ci_high"].max())


def combine_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per unit and variant from the suite's ``repeats`` sessions.

    Speedup: geometric mean of the sessions' speedups; interval: from the lowest session's
    lower bound to the highest session's upper bound, so it holds what independent runs gave,
    each with its own 95% interval. Latencies: median over sessions. ``repeats`` counts the
    sessions that measured the row; ``speedup_repeats`` lists their speedups.
    """
    if "repeat" not in df.columns:
        return df.assign(repeats=1)
    rows = []
    for _, g in df.groupby(UNIT_KEY, sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        if not len(ok):
            rows.append({**g.iloc[0].to_dict(), "repeats": 0})
            continue
        row = ok.iloc[0].to_dict()
        row["repeats"] = len(ok)
        for col in LATENCY_COLUMNS:
            if col in ok and ok[col].notna().any():
                row[col] = float(ok[col].median())
        if ok["speedup"].notna().any():
            _combine_ratio(ok, row, "speedup")
            if "device_speedup" in ok:
                _combine_ratio(ok, row, "device_speedup")
            row["efficiency"] = row["speedup"] / row["flops_reduction"]
            row["speedup_repeats"] = " ".join(f"{x:.3f}" for x in ok["speedup"])
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.drop(columns=["repeat"]) if "repeat" in out else out


def repeats_text(s: pd.DataFrame) -> str:
    """How the page's intervals were formed (``s``: the measured slim rows)."""
    n = int(s["repeats"].max()) if len(s) else 1
    if n <= 1:
        return ("Interval: 95% bootstrap over the interleaved rounds of one session (within-run noise only; "
                "set `repeats` to cover run-to-run variation).")
    return (f"Interval: each unit was measured in {int(n)} independent sessions, each in its own pass over "
            "all units (minutes apart, fresh sessions); the speedup is their geometric mean and the interval "
            "runs from the lowest session's 95% lower bound to the highest session's upper bound, so it "
            "covers run-to-run variation (the sessions' speedups are in `speedup_repeats`).")


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """The bench columns, then the suite's, then anything else."""
    front = [c for c in df.columns if c not in SUITE_COLUMNS]
    n = len(table.REQUIRED)
    return df[front[:n] + [c for c in SUITE_COLUMNS if c in df.columns] + front[n:]]


def slim_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Measured slim rows with their base's latency beside them (``base_*``) and the interval as text."""
    ok = df[df["status"] == "ok"]
    key = ["operating_point", "rounding", "backend", "device", "precision", "batch"]
    cols = [c for c in BASE_COLUMNS if c in ok.columns]
    base = ok[ok["variant"] == "base"][key + cols].rename(columns={c: f"base_{c}" for c in cols})
    slim = ok[(ok["variant"] == "slim") & ok["speedup"].notna()].merge(base, on=key, how="left")
    slim["speedup_ci"] = [f"{r.speedup:.2f} [{r.speedup_ci_low:.2f}, {r.speedup_ci_high:.2f}]"
                          for r in slim.itertuples()]
    if "device_speedup" in slim:
        slim["device_speedup_ci"] = [
            f"{r.device_speedup:.2f} [{r.device_speedup_ci_low:.2f}, {r.device_speedup_ci_high:.2f}]"
            if pd.notna(r.device_speedup) else "-" for r in slim.itertuples()]
    return slim.sort_values(["model", "source", "target_flops_reduction", "backend", "batch", "rounding"])


def summary(s: pd.DataFrame) -> pd.DataFrame:
    """One row per operating point x stage x backend x device x precision x batch of the slim rows
    ``s`` (an fp16 and a bf16 row are two rows): rounding 8 if measured, else the fastest rounding."""
    rows = []
    key = [k for k in SUMMARY_KEY if k in s.columns]
    for _, g in s.groupby(key, sort=False, dropna=False):
        r8 = g[g["rounding"] == 8]
        rows.append(r8.iloc[0] if len(r8) else g.loc[g["speedup"].idxmax()])
    return pd.DataFrame(rows) if rows else s.iloc[0:0]


def plot(s: pd.DataFrame, path: Path) -> Path:
    """FLOPs reduction vs measured speedup (with its interval) per backend/batch, and y = x."""
    from matplotlib.figure import Figure  # an Agg canvas, no pyplot global state (as bench.report)
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8.5, 6))
    ax = fig.subplots()
    markers = {1: "o", 8: "s", 32: "^"}
    keys = ["model", "backend", "device", "precision", "batch"]
    # one colour per (model, backend, device, precision, batch) series, one marker per width rounding: no colour is
    # reused (tab20 has 20 distinct colours; the suite has 8 series)
    series = list(s.groupby(keys).groups) if len(s) else []
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray",
                                     "olive", "cyan")]
    colours = {key: palette[i] if i < len(palette) else f"C{i}" for i, key in enumerate(series)}
    handles = []
    for key, g in s.groupby(keys):
        model, backend, device, precision, batch = key
        for rnd, gg in g.groupby("rounding"):
            err = [gg["speedup"] - gg["speedup_ci_low"], gg["speedup_ci_high"] - gg["speedup"]]
            ax.errorbar(gg["flops_reduction"], gg["speedup"], yerr=err, fmt=markers.get(int(rnd), "x"),
                        color=colours[key], capsize=2, alpha=0.85)
        handles.append(Line2D([], [], color=colours[key], marker="o", ls="", label=f"{model} {backend} {device} {precision} b{batch}"))
    handles += [Line2D([], [], color="k", marker=m, ls="", label=f"rounding {r}") for r, m in markers.items()
                if len(s) and r in set(s["rounding"].astype(int))]
    top = max([1.0, *s["flops_reduction"].tolist()]) * 1.05 if len(s) else 8.0
    (ref,) = ax.plot([1, top], [1, top], "k--", lw=1, label="y = x (FLOPs cut = time cut)")
    ax.set_xlabel("FLOPs reduction (base / slim)")
    ax.set_ylabel("measured speedup (base / slim latency, end to end)")
    ax.set_title(f"Papers' operating points: FLOPs reduction vs measured speedup ({device_label(s)})")
    ax.grid(alpha=0.3)
    ax.legend(handles=[*handles, ref], fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def device_label(s: pd.DataFrame) -> str:
    """The devices the rows ``s`` were measured on, for titles: ``CPU``, the GPU's name, or both."""
    names = []
    for device in sorted(s["device"].dropna().unique()) if len(s) else []:
        if device == "cuda":
            names.append(_first(s[s["device"] == "cuda"], "gpu_name") or "CUDA GPU")
        else:
            names.append(str(device).upper())
    return ", ".join(names) or "nothing measured"


def _first(df: pd.DataFrame, col: str) -> Any:
    vals = df[col].dropna() if col in df else pd.Series(dtype=object)
    return vals.iloc[0] if len(vals) else None


def skipped_lines(df: pd.DataFrame) -> list[str]:
    """One line per distinct reason a combination was not measured."""
    bad = df[df["status"] != "ok"]
    lines = []
    for (backend, device, precision, status, err), g in bad.groupby(
            ["backend", "device", "precision", "status", "error"], dropna=False):
        units = g[["operating_point", "rounding", "batch"]].drop_duplicates()
        pairs = g[["operating_point", "rounding"]].drop_duplicates()
        which = ("; " + ", ".join(f"{r.operating_point} r{int(r.rounding)}" for r in pairs.itertuples())
                 if len(pairs) <= 4 else "")
        lines.append(f"- `{backend}` {device} {precision}: **{status}** ({len(units)} point x rounding x "
                     f"batch combinations{which}): {err}")
    return lines


def gpu_line(df: pd.DataFrame) -> str:
    """What the page says about GPU rows: measured, or plainly not."""
    cuda = df[df["device"] == "cuda"]
    if (cuda["status"] == "ok").any():
        return (f"GPU rows measured on {_first(cuda, 'gpu_name')} (wall clock). Their speedup is end to end, "
                "host<->device copies included (these do not shrink with pruning); the device speedup "
                "(CUDA events around the inference alone) is beside it. Efficiency uses the end-to-end "
                "speedup.")
    return ("**No GPU was available for this run**: every CUDA row (torch eager fp16/bf16 channels_last, "
            "torch.compile, AOTInductor, ONNX Runtime CUDA, TensorRT fp16/int8) is a `skipped` row with its "
            "reason, and no GPU figure is estimated.")


def page(df: pd.DataFrame, s: pd.DataFrame, *, cfg: SuiteConfig, command: str, notes: str = "") -> str:
    """The Markdown results page: ``df`` is the whole table, ``s`` its measured slim rows."""
    wsrc = _first(df, "width_source") or "uniform"
    clocks = ", ".join(sorted({str(c) for c in s["clock"].dropna()})) or "-"
    threads = ", ".join(sorted({str(int(t)) for t in s["threads"].dropna()})) or "-"
    width_text = ("beta scores learnt on the ImageNet folder (OSPR eq. 2-4), global ranking" if wsrc == "beta"
                  else "a uniform ratio: the same fraction removed from every prunable node, solved for "
                  "the FLOPs target on the real cut model (no ImageNet folder was given)")
    out = [
        "# The papers' FLOPs claims as measured speedups", "",
        f"Models: ImageNet shape ({cfg.in_channels}x{cfg.input_size}x{cfg.input_size} input, "
        f"{cfg.num_classes} classes), **random weights** (latency does not depend on weight values, so no "
        "checkpoint is needed for timing). Widths: " + width_text + ". OSPR's crucial-node rule: VGG-16 keeps "
        "conv5_1..conv5_3, ResNet-50 keeps the block outputs (res2c, res3d, res4f, res5c) and prunes the "
        "bottleneck internals; RBP points keep only the last conv node (needed by the allocator).", "",
        f"Device: {_first(df, 'cpu_model')} (CPU, shared with other jobs, 1-min load "
        f"{df['load_avg_1m'].min():.1f}-{df['load_avg_1m'].max():.1f}); torch {_first(df, 'torch_version')}, "
        f"onnxruntime {_first(df, 'onnxruntime_version')}. Threads: {threads}; clock: {clocks} "
        "(`cpu` = the process's CPU time of one thread: the latency on an idle core, unaffected by the other "
        "jobs; see docs/bench.md). Speedup = geometric mean of per-round base/slim median ratios over "
        "interleaved rounds; efficiency = speedup / FLOPs reduction. " + repeats_text(s), "",
        gpu_line(df), "",
        "Command of this page (it resumes from the cached units under `--out`; without `budget_minutes` "
        "it measures everything not yet measured):", "", "```bash", command, "```", "",
        "## Per operating point (rounding 8 where measured, else the fastest rounding)", "",
        markdown_table(summary(s), row_columns(s)), "",
        "## Every measured slim row", "", markdown_table(s, row_columns(s)), "",
        "![FLOPs reduction vs measured speedup](paper_claims.png)", "",
        "## Not measured here", "", *(skipped_lines(df) or ["(none)"]), "",
    ]
    if notes.strip():
        out += ["## How these numbers were produced", "", notes.strip(), ""]
    return "\n".join(out)


def measured_table(s: pd.DataFrame) -> pd.DataFrame:
    """The CSV's rows: every measured slim-vs-base comparison (``s``, from :func:`slim_rows`), bench
    columns first, then the suite's, then the base's ``base_*`` latency."""
    s = s.drop(columns=[c for c in ("speedup_ci", "device_speedup_ci") if c in s])
    base = [c for c in s.columns if c.startswith("base_")]
    return ordered(s[[c for c in s.columns if c not in base] + base]).reset_index(drop=True)


def write_results(df: pd.DataFrame, out: Path, *, cfg: SuiteConfig, command: str,
                  notes: str = "") -> list[Path]:
    """``paper_claims.csv`` (measured rows only), ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    df = combine_repeats(df)
    s = slim_rows(df)
    csv = atomic_write_text(out / "paper_claims.csv", measured_table(s).to_csv(index=False))
    png = plot(s, out / "paper_claims.png")
    md = atomic_write_text(out / "paper_claims.md", page(df, s, cfg=cfg, command=command, notes=notes))
    return [csv, md, png]

