"""``bench explain`` outputs: explain.csv / explain.json (the tidy table), explain.png, report.md."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from deploy_prune.artifacts import atomic_write_text

CSV_COLUMNS = ("model", "backend", "device", "precision", "batch", "row", "kind", "channels_base",
               "channels_slim", "flops_base", "flops_slim", "time_base_ms", "time_slim_ms",
               "flops_reduction", "time_reduction", "efficiency", "share_base", "share_slim",
               "excess_ms", "saved_ms", "speedup_share")


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    ident = {k: result[k] for k in ("model", "backend", "device", "precision", "batch")}
    for r in result["rows"]:
        w.writerow({**ident, **{k: ("" if v is None else v) for k, v in r.items()}})
    return buf.getvalue()


def diagnosis_lines(result: dict[str, Any]) -> list[str]:
    """The diagnosis in sentences a user can act on (Markdown bullets)."""
    d, m, rec = result["diagnosis"], result["measured"], result["reconciliation"]
    lines = [
        f"- **Speedup {m['speedup']:.2f}x for {m['flops_reduction']:.2f}x fewer FLOPs** (efficiency "
        f"{m['efficiency']:.2f}): the slim takes {m['slim_p50_ms']:.3f} ms where FLOPs-proportional "
        f"scaling would give {d['ideal_slim_ms']:.3f} ms; {d['missing_ms']:.3f} ms are missing."]
    if d["where_missing"]:
        parts = [f"`{w['row']}` {w['excess_ms']:.3f} ms" + (f" ({100 * w['share']:.0f}%)" if w["share"] else "")
                 for w in d["where_missing"]]
        lines.append("- **Where the missing time is** (slim time beyond the row's base time / the model's "
                     "FLOPs reduction): " + ", ".join(parts) + ".")
    if d["lagging_layers"]:
        parts = [f"`{r['row']}` ({r['channels']} channels: FLOPs {r['flops_reduction']:.2f}x, time "
                 f"{_f(r['time_reduction'], '.2f')}x, efficiency {r['efficiency']:.2f})" for r in d["lagging_layers"]]
        lines.append("- **Lost FLOPs but little time:** " + "; ".join(parts) + ".")
    else:
        lines.append("- **Lost FLOPs but little time:** no pruned node has efficiency below 0.7.")
    lay = d["layout_ms"]
    lines.append(f"- **Layout conversions** (reorders, transposes, reformats): {lay['base']:.3f} ms in the base, "
                 f"{lay['slim']:.3f} ms in the slim ({100 * d['layout_share_slim']:.1f}% of its time).")
    if d["odd_widths"]:
        ws = ", ".join(f"`{o['node']}` {o['channels']} -> {o['rounded']}" for o in d["odd_widths"])
        line = (f"- **Widths off a multiple of {d['preferred_multiple']}** ({d['preferred_why']}): {ws}. "
                f"Re-prune with `--round-to {d['preferred_multiple']}`.")
        p = d.get("rounding_probe")
        if p and "error" not in p:
            line += (f" Predicted (the rounded widths timed against this slim in paired rounds): "
                     f"{p['speedup_over_slim']:.3f}x faster than the slim ({p['slim_ms']:.3f} -> "
                     f"{p['rounded_ms']:.3f} ms), {p['flops_reduction']:.2f}x fewer FLOPs than the base, "
                     f"speedup over the base {p['speedup_over_base']:.2f}x.")
        elif p:
            line += f" The rounded widths could not be timed: {p['error']}."
        lines.append(line)
    else:
        lines.append(f"- **Widths:** every pruned node is a multiple of {d['preferred_multiple']} "
                     f"({d['preferred_why']}).")
    ceil = d["ceiling_speedup"]
    lines.append(f"- **Overhead no pruning removes:** {d['fixed_overhead_ms']:.3f} ms per call "
                 f"({100 * d['fixed_share_slim']:.1f}% of the slim's time), "
                 f"so no pruning of this model can exceed {_f(ceil, '.1f')}x at batch {result['batch']}. "
                 f"With the rows this plan leaves whole ({', '.join(f'`{r}`' for r in d['unpruned_rows']) or 'none'}: "
                 f"{d['unpruned_ms']:.3f} ms) the ceiling is {_f(d['ceiling_speedup_with_unpruned'], '.2f')}x.")
    status = "within" if rec["reconciled"] else "outside"
    gaps = ", ".join(f"{v} {rec[v]['profiled_ms']:.3f} vs {rec[v]['unprofiled_ms']:.3f} ms "
                     f"({100 * rec[v]['gap_fraction']:+.1f}%)" for v in ("base", "slim"))
    drifts = ", ".join(f"{v} {rec[v]['drift']:.3f}" for v in ("base", "slim"))
    cal = result.get("calibration") or {}
    lines.append(f"- **Reconciliation:** profiled rows + per-call overhead vs unprofiled calls interleaved "
                 f"with the profiled ones (medians): {gaps}; {status} the "
                 f"{100 * rec['tolerance']:.0f}% tolerance. "
                 f"Rows are put on the paired measurement's scale by the load drift (paired p50 / "
                 f"interleaved unprofiled median: {drifts}). The `gap` row carries the difference "
                 f"(positive: time between profiled events, e.g. Python between modules or launch gaps; "
                 f"negative: profiler overhead left in the rows). Calibration: "
                 f"{_f(cal.get('per_event_ms'), '.4f')} ms per profiled event removed from each, "
                 f"{_f(cal.get('per_call_ms'), '.4f')} ms per call ({cal.get('how', '-')}).")
    return lines


def _label(r: dict[str, Any]) -> str:
    if r["kind"] == "node" and r["channels_base"] is not None:
        return f"{r['row']} ({r['channels_base']}->{r['channels_slim']})"
    return r["row"]


def plot(result: dict[str, Any], path: Path, top: int = 12) -> Path:
    """Stacked bars of base and slim time per row, and each row's excess slim time."""
    rows = [r for r in result["rows"] if r["kind"] != "gap"]
    rows.sort(key=lambda r: r["time_base_ms"], reverse=True)
    shown, rest = rows[:top], rows[top:]
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1.1, 1))
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    gap_label = "gap: measured - profiled"
    for i, variant in enumerate(("base", "slim")):
        left = 0.0
        for j, r in enumerate(shown):
            w = r[f"time_{variant}_ms"]
            ax.barh(i, w, left=left, color=cmap(j % 20), edgecolor="white", linewidth=0.5,
                    label=_label(r) if i == 0 else None)
            left += w
        w = sum(r[f"time_{variant}_ms"] for r in rest)
        if w > 0:
            ax.barh(i, w, left=left, color="lightgrey", label=f"{len(rest)} smaller rows" if i == 0 else None)
            left += w
        gap = next((r[f"time_{variant}_ms"] for r in result["rows"] if r["kind"] == "gap"), 0.0)
        if gap > 0:
            ax.barh(i, gap, left=left, color="white", edgecolor="grey", hatch="//", label=gap_label)
            gap_label = None
    m = result["measured"]
    ax.set_yticks([0, 1], [f"base\n{m['base_p50_ms']:.2f} ms", f"slim\n{m['slim_p50_ms']:.2f} ms"])
    ax.invert_yaxis()
    ax.set_xlabel("time per call (ms; profiled rows on the measured p50's scale)")
    ax.set_title(f"{result['model']}: {result['backend']} {result['device']} {result['precision']}, "
                 f"batch {result['batch']}: {m['speedup']:.2f}x for {m['flops_reduction']:.2f}x fewer FLOPs",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ex = sorted(result["rows"], key=lambda r: r["excess_ms"], reverse=True)[:top]
    ax2.barh(range(len(ex)), [r["excess_ms"] for r in ex],
             color=["tab:red" if r["excess_ms"] > 0 else "tab:green" for r in ex])
    ax2.set_yticks(range(len(ex)), [_label(r) for r in ex], fontsize=8)
    ax2.invert_yaxis()
    ax2.axvline(0, color="black", linewidth=0.8)
    ax2.set_xlabel("slim time beyond FLOPs-proportional scaling (ms)")
    ax2.set_title("where the missing speedup went", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def markdown(result: dict[str, Any], picture: str | None) -> str:
    m = result["measured"]
    env = result.get("environment") or {}
    lines = [f"# Where the time went: {result['model']}, {result['backend']} {result['device']} "
             f"{result['precision']}, batch {result['batch']}", ""]
    if result.get("command"):
        lines += ["```bash", result["command"], "```", ""]
    lines += [f"Base `{result['base_dir']}`, slim `{result['slim_dir']}`. {env.get('cpu_model') or ''}, "
              f"{result['threads']} thread(s), clock {result['clock']}, 1-min load {_f(env.get('load_avg_1m'), '.1f')}. "
              f"Measured (paired interleaved rounds, {m['samples']} calls each): p50 {m['base_p50_ms']:.3f} -> "
              f"{m['slim_p50_ms']:.3f} ms, speedup {m['speedup']:.3f}x [{m['speedup_ci'][0]:.3f}, "
              f"{m['speedup_ci'][1]:.3f}], FLOPs reduction {m['flops_reduction']:.2f}x, efficiency "
              f"{m['efficiency']:.2f}. Per-row times: {result['profiler']['base']['source']}, median of "
              f"{result['profiler']['base']['calls']} profiled calls per variant.", "", "## Diagnosis", ""]
    lines += diagnosis_lines(result)
    if picture:
        lines += ["", f"![where the time went]({picture})"]
    lines += ["", "## Per row", "",
              "FLOPs at batch 1 (multiply-add = 2). Efficiency = time reduction / FLOPs reduction. "
              "Excess = slim time minus base time / the model's FLOPs reduction.", "",
              "| row | kind | channels | FLOPs base | FLOPs slim | ms base | ms slim | FLOPs red. | time red. "
              "| efficiency | share of slim | excess ms |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ch = f"{r['channels_base']} -> {r['channels_slim']}" if r["channels_base"] is not None else ""
        lines.append(f"| {r['row']} | {r['kind']} | {ch} | {r['flops_base'] / 1e6:.2f} M | {r['flops_slim'] / 1e6:.2f} M "
                     f"| {r['time_base_ms']:.3f} | {r['time_slim_ms']:.3f} | {_f(r['flops_reduction'], '.2f')} "
                     f"| {_f(r['time_reduction'], '.2f')} | {_f(r['efficiency'], '.2f')} "
                     f"| {100 * r['share_slim']:.1f}% | {r['excess_ms']:.3f} |")
    tb = sum(r["time_base_ms"] for r in result["rows"])
    ts = sum(r["time_slim_ms"] for r in result["rows"])
    lines.append(f"| **total (= measured p50)** | | | | | {tb:.3f} | {ts:.3f} | {m['flops_reduction']:.2f} "
                 f"| {m['base_p50_ms'] / m['slim_p50_ms']:.2f} | {m['efficiency']:.2f} | 100% | |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """explain.json, explain.csv, explain.png and report.md under ``out``."""
    atomic_write_text(out / "explain.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "explain.csv", to_csv(result))
    picture = None
    try:
        plot(result, out / "explain.png")
        picture = "explain.png"
    except Exception as e:  # a plot failure must not lose the table
        import logging

        logging.getLogger(__name__).warning("explain plot failed: %s", e)
    atomic_write_text(out / "report.md", markdown(result, picture))


def _top_excess(result: dict[str, Any], n: int = 2) -> str:
    d = result["diagnosis"]
    return "; ".join(f"{w['row']} {w['excess_ms']:.2f} ms" for w in d["where_missing"][:n]) or "-"


def index(results: dict[str, dict[str, Any]]) -> str:
    """One summary row per run (``name -> explain.json``), for docs/results/explain/README.md."""
    lines = ["| run | backend | batch | base -> slim p50 ms | speedup | FLOPs red. | efficiency | "
             "classifier share of slim | unpruned rows, ms (share) | most missing time | reconciled (profiled vs unprofiled) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, d, rec = r["measured"], r["diagnosis"], r["reconciliation"]
        cls = sum(x["share_slim"] for x in r["rows"] if x["kind"] == "classifier")
        gaps = " / ".join(f"{100 * rec[v]['gap_fraction']:+.1f}%" for v in ("base", "slim"))
        lines.append(f"| [{name}]({name}/report.md) | {r['backend']} {r['device']} | {r['batch']} "
                     f"| {m['base_p50_ms']:.2f} -> {m['slim_p50_ms']:.2f} | {m['speedup']:.2f}x "
                     f"| {m['flops_reduction']:.2f}x | {m['efficiency']:.2f} | {100 * cls:.1f}% "
                     f"| {d['unpruned_ms']:.2f} ({100 * d['unpruned_ms'] / m['slim_p50_ms']:.0f}%) "
                     f"| {_top_excess(r)} | {'yes' if rec['reconciled'] else 'no'} ({gaps}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bench.explain_report DIR: print the index of DIR/*/explain.json
    import sys

    root = Path(sys.argv[1])
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/explain.json"))}
    print(index(found))
