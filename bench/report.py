"""``OUT/report.md`` and the plots, rendered from the results table and nothing else.

Plots (PNG, Agg canvas, no pyplot global state):
- ``latency_vs_batch.png``: p50 end-to-end latency against batch size, one panel per backend,
  base solid and slim dashed;
- ``speedup_vs_flops.png``: measured speedup (with its 95% interval) against the FLOPs
  reduction, with the line y = x where a speedup would equal the FLOPs claim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from deploy_prune.artifacts import atomic_write_text

LATENCY_PNG = "latency_vs_batch.png"
SPEEDUP_PNG = "speedup_vs_flops.png"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if spec else str(value)


def markdown_table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``df``; ``columns`` are (column, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row[c], f) for c, _, f in columns) + " |"
            for _, row in df.iterrows()]
    return "\n".join([head, rule, *body]) if body else "(none)"


def speedup_view(df: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration: base and slim p50 side by side with the slim row's speedup."""
    ok = df[df["status"] == "ok"]
    key = ["backend", "device", "precision", "batch"]
    base = ok[ok["variant"] == "base"].set_index(key)
    slim = ok[ok["variant"] == "slim"].set_index(key)
    view = slim[["speedup", "speedup_ci_low", "speedup_ci_high", "flops_reduction", "efficiency",
                 "p50_ms", "p99_ms", "top1"]].rename(columns={"p50_ms": "slim_p50_ms", "p99_ms": "slim_p99_ms",
                                                               "top1": "slim_top1"})
    view = view.join(base[["p50_ms", "p99_ms", "top1"]].rename(
        columns={"p50_ms": "base_p50_ms", "p99_ms": "base_p99_ms", "top1": "base_top1"}), how="left")
    if "device_speedup" in slim:
        view = view.join(slim[["device_speedup", "device_speedup_ci_low", "device_speedup_ci_high"]])
    view = view.reset_index()
    view["ci"] = [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(view["speedup_ci_low"], view["speedup_ci_high"])]
    if "device_speedup" in view:
        view["device_ci"] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if v == v else "-" for v, lo, hi in zip(
            view["device_speedup"], view["device_speedup_ci_low"], view["device_speedup_ci_high"])]
    return view


def has_device_speedup(df: pd.DataFrame) -> bool:
    """Whether any measured row carries a device-only (CUDA events) speedup."""
    return "device_speedup" in df and bool(df.loc[df["status"] == "ok", "device_speedup"].notna().any())


SPEEDUP_COLUMNS = (("backend", "backend", ""), ("device", "device", ""), ("precision", "precision", ""),
                   ("batch", "batch", ""), ("base_p50_ms", "base p50 ms", ".3f"),
                   ("slim_p50_ms", "slim p50 ms", ".3f"), ("speedup", "speedup", ".3f"),
                   ("ci", "95% CI", ""), ("flops_reduction", "FLOPs reduction", ".2f"),
                   ("efficiency", "efficiency", ".2f"), ("base_top1", "base top1 %", ".2f"),
                   ("slim_top1", "slim top1 %", ".2f"))
LATENCY_COLUMNS = (("variant", "variant", ""), ("backend", "backend", ""), ("device", "device", ""),
                   ("precision", "precision", ""), ("batch", "batch", ""), ("p50_ms", "p50 ms", ".3f"),
                   ("p90_ms", "p90 ms", ".3f"), ("p99_ms", "p99 ms", ".3f"), ("mean_ms", "mean ms", ".3f"),
                   ("throughput_ips", "img/s", ".0f"), ("samples", "n", ".0f"),
                   ("device_p50_ms", "device p50 ms", ".3f"))
DEVICE_SPEEDUP_COLUMN = ("device_ci", "device speedup [95% CI]", "")
STATUS_COLUMNS = (("backend", "backend", ""), ("device", "device", ""), ("precision", "precision", ""),
                  ("status", "status", ""), ("error", "reason", ""))


def environment_lines(environment: dict[str, Any]) -> list[str]:
    """Markdown bullets: CPU, threads and load, library versions, GPU and its clocks."""
    v = environment.get("versions", {})
    lines = [f"- CPU: {environment.get('cpu_model')} ({environment.get('cpu_count')} logical cores), "
             f"{environment.get('threads')} threads pinned, 1-min load average "
             f"{environment.get('load_avg_1m')} at start",
             f"- torch {v.get('torch')}, onnxruntime {v.get('onnxruntime', '-')}, "
             f"python {v.get('python')}, {environment.get('platform')}"]
    if environment.get("gpu_name"):
        lines.append(f"- GPU: {environment['gpu_name']}, driver {environment.get('gpu_driver', '-')}, "
                     f"CUDA driver {environment.get('cuda_driver', '-')} / runtime {v.get('cuda_runtime')}, "
                     f"SM clock {environment.get('gpu_sm_clock_mhz', '-')} of "
                     f"{environment.get('gpu_sm_clock_max_mhz', '-')} MHz, throttle reasons: "
                     f"{environment.get('gpu_throttle_reasons', '-')}")
    return lines


def speedup_columns(df: pd.DataFrame) -> tuple[tuple[str, str, str], ...]:
    """The speedup table's columns: the device speedup beside the end-to-end one on CUDA."""
    if not has_device_speedup(df):
        return SPEEDUP_COLUMNS
    i = [c for c, _, _ in SPEEDUP_COLUMNS].index("ci") + 1
    return (*SPEEDUP_COLUMNS[:i], DEVICE_SPEEDUP_COLUMN, *SPEEDUP_COLUMNS[i:])


def device_note(df: pd.DataFrame) -> str:
    """What the page says about the two speedups when CUDA rows are there."""
    if not has_device_speedup(df):
        return ""
    return (" On CUDA, the end-to-end speedup includes the host<->device copies, which pruning does "
            "not shrink; the device speedup (CUDA events around the inference alone) is beside it. "
            "Efficiency uses the end-to-end speedup.")


def markdown(df: pd.DataFrame, *, environment: dict[str, Any], command: str | None = None) -> str:
    """The whole report as Markdown text."""
    model = df["model"].iloc[0] if len(df) else "?"
    ok = df[df["status"] == "ok"]
    other = df[df["status"] != "ok"].drop_duplicates(["backend", "device", "precision", "status", "error"])
    parts = [f"# Benchmark: {model}, slim vs base", ""]
    if command:
        parts += ["Reproduce with:", "", "```", command, "```", ""]
    clocks = ", ".join(sorted(ok["clock"].dropna().astype(str).unique())) or "-"
    parts += ["## Environment", "", *environment_lines(environment),
              f"- clock: {clocks} (wall: host wall clock; cpu: process CPU time, one thread)", "",
              "## Speedup of slim over base", "",
              "Speedup = paired ratio of end-to-end latencies (geometric mean of per-round median "
              "ratios, base and slim timed in alternating rounds in one process); the interval is a "
              "seeded bootstrap over rounds. Efficiency = speedup / FLOPs reduction (1.0: the FLOPs "
              "cut became wall-clock time one for one)." + device_note(df), "",
              markdown_table(speedup_view(df), speedup_columns(df)), "",
              "## Latency", "", markdown_table(ok, LATENCY_COLUMNS), "",
              "## Skipped and failed", "", markdown_table(other, STATUS_COLUMNS), "",
              "## Plots", "", f"![latency vs batch]({LATENCY_PNG})", "",
              f"![speedup vs FLOPs reduction]({SPEEDUP_PNG})", ""]
    return "\n".join(parts)


def plot_latency(df: pd.DataFrame, path: Path) -> Path:
    """p50 latency vs batch, one panel per backend; colour per device/precision, base solid with
    circles and slim dashed with squares."""
    ok = df[df["status"] == "ok"]
    backends = sorted(ok["backend"].unique()) or ["(no measurements)"]
    fig = Figure(figsize=(4.5 * len(backends), 3.8), layout="constrained")
    axes = fig.subplots(1, len(backends), squeeze=False)[0]
    for ax, name in zip(axes, backends):
        sub = ok[ok["backend"] == name]
        for i, ((device, precision), g) in enumerate(sub.groupby(["device", "precision"])):
            for variant, gv in g.groupby("variant"):
                gv = gv.sort_values("batch")
                ax.plot(gv["batch"], gv["p50_ms"], marker="o" if variant == "base" else "s", color=f"C{i}",
                        linestyle="-" if variant == "base" else "--", label=f"{variant} {device} {precision}")
        ax.set(title=name, xlabel="batch", ylabel="p50 latency (ms)")
        if len(sub):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # labelled ticks at the measured batches, and at 1-1.5-2-3-5-7 steps of latency, so a range
            # inside one decade still shows several labels
            ax.xaxis.set_major_locator(FixedLocator(sorted(sub["batch"].unique())))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def plot_speedup(df: pd.DataFrame, path: Path) -> Path:
    """Measured speedup (95% CI bars) against FLOPs reduction, with y = x and y = 1."""
    slim = df[(df["status"] == "ok") & (df["variant"] == "slim")]
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    top = max([1.5, *slim["flops_reduction"].tolist(), *slim["speedup_ci_high"].tolist()]) * 1.1
    ax.plot([0, top], [0, top], color="grey", label="y = x (speedup = FLOPs reduction)")
    ax.axhline(1.0, color="grey", linestyle=":", label="no speedup")
    groups = list(slim.groupby(["backend", "device", "precision"]))
    for i, ((name, device, precision), g) in enumerate(groups):
        dodge = (i - (len(groups) - 1) / 2) * 0.02 * top  # side by side, not on top of each other
        err = [g["speedup"] - g["speedup_ci_low"], g["speedup_ci_high"] - g["speedup"]]
        ax.errorbar(g["flops_reduction"] + dodge, g["speedup"], yerr=err, fmt="o", capsize=3,
                    label=f"{name} {device} {precision}")
        for _, r in g.iterrows():
            ax.annotate(f"b{r['batch']}", (r["flops_reduction"] + dodge, r["speedup"]), fontsize=6,
                        xytext=(3, 0), textcoords="offset points")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="FLOPs reduction (x; groups dodged sideways)",
           ylabel="measured speedup (x, 95% CI)", title="FLOPs reduction vs measured speedup")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def render(df: pd.DataFrame, out: str | Path, *, environment: dict[str, Any],
           command: str | None = None) -> Path:
    """Write ``report.md`` and both plots into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_latency(df, out / LATENCY_PNG)
    plot_speedup(df, out / SPEEDUP_PNG)
    return atomic_write_text(out / "report.md", markdown(df, environment=environment, command=command))
