"""The torchvision family matrix: every classification model pruned at 2x fewer FLOPs, run in
eval and train mode, exported to ONNX with parity, and timed against its base on ONNX Runtime
CPU (batch 1, one thread, CPU clock, paired rounds).

    python -m bench.families run --out runs/families [--models a,b] [--timeout 600]
    python -m bench.families run --out runs/zoo --models timm.resnet18,timm.mobilenetv3_large_100
    python -m bench.families list --zoo timm     # timm's CNN names (the pruner still decides)
    python -m bench.families render runs/families/families.csv --out docs/results

Each model runs in its own subprocess (a crash or a time-out is that model's row, not the
end of the matrix); rows are appended to ``families.csv`` as they finish, so a rerun resumes.
Transformers are refused by ``discover`` with one line; that is recorded as a ``refused`` row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.timing import TimingConfig

FIELDS = ("model", "status", "input", "nodes", "prunable", "flops_asked", "flops_got", "base_mflops",
          "parity", "parity_max_abs_diff", "output_scale", "speedup", "speedup_low", "speedup_high", "efficiency",
          "base_ms", "slim_ms", "seconds", "detail")
# inception_v3 needs at least 75x75 pixels; everything else runs at 64x64
INPUT_SIZE = {"inception_v3": 96}
MATRIX_TIMING = TimingConfig(warmup_s=0.3, warmup_iters=5, min_time_s=1.0, rounds=12, min_samples=48,
                             min_per_round=3, clock="cpu")


def models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


class ArchError(ValueError):
    """A matrix name that no registry builds (or timm.NAME without timm)."""


def _refusals() -> tuple[type[Exception], ...]:
    from deploy_prune.decisions import AllocationError
    from deploy_prune.nodes import UnsupportedModel
    from deploy_prune.surgery import PlanError

    return (UnsupportedModel, AllocationError, PlanError, ArchError)


def arch_of(name: str) -> str:
    """The architecture a matrix name builds: a bare torchvision name (``resnet18``) is
    ``tv.resnet18``; any name the model registry knows (``timm.resnet26d``, ``tv.vgg11``,
    ``resnet20``) is itself."""
    from deploy_prune.models import MODELS

    if name in MODELS or "." in name:
        return name
    return f"tv.{name}"


def prune_one(name: str, *, flops: float = 2.0, seed: int = 0, size: int | None = None,
              overrides: list[str] | None = None):
    """(base, base_plan, PruneResult) for ``name`` (a bare torchvision name or any registered
    architecture, see :func:`arch_of`) at ``flops``x, L1 scores; ``overrides``: ``key=value``
    config settings on top (``allocation.round_to=8``)."""
    from deploy_prune import pipeline
    from deploy_prune.artifacts import ModelPlan
    from deploy_prune.config import RunConfig, from_dict, merge, parse_overrides
    from deploy_prune.models import build_model, get_spec

    try:
        get_spec(arch_of(name))
    except KeyError as e:  # an unknown name, or timm.NAME without timm: the one line is the row
        raise ArchError(e.args[0] if e.args else str(e)) from None
    torch.manual_seed(seed)
    size = size or INPUT_SIZE.get(name, 64)
    plan = ModelPlan(arch_of(name), 10, 3, size)
    model = build_model(plan.arch, num_classes=10, in_channels=3).eval()
    cfg = from_dict(RunConfig, merge({"scoring": {"method": "l1"}, "allocation": {"flops_reduction": flops},
                                      "speed_check": {"enabled": False}}, parse_overrides(overrides)))
    result = pipeline.score(model, plan, cfg, None, torch.device("cpu"))
    scores = {k: np.asarray(v) for k, v in result["channel_scores"].items()}
    return model, plan, pipeline.prune(model, plan, cfg, scores)


def check_one(name: str, *, timing: TimingConfig = MATRIX_TIMING, flops: float = 2.0,
              size: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """One matrix row: prune -> forward eval+train -> ONNX export with parity -> paired timing."""
    from bench.guard import measure
    from export.parity import probe_inputs
    from export.to_onnx import export_onnx, verify_onnx

    t0 = time.perf_counter()
    size = size or INPUT_SIZE.get(name, 64)
    row: dict[str, Any] = {"model": name, "flops_asked": flops, "input": f"3x{size}"}
    try:
        base, plan, res = prune_one(name, flops=flops, size=size, overrides=overrides)
    except _refusals() as e:  # the one-line refusal (transformers, untraceable graphs, out of reach,
        # unknown arch); any other exception is the model's error row, not a refusal
        row.update(status="refused", detail=str(e).splitlines()[0], seconds=time.perf_counter() - t0)
        return row
    info = res.plan.info
    row.update(nodes=len(res.nodes), prunable=sum(n.prunable for n in res.nodes),
               flops_got=info["flops_reduction"], base_mflops=info["base_flops"] / 1e6)
    slim = res.slim
    x = plan.example(2)
    slim.train()
    with torch.no_grad():
        slim(x)
    slim.eval()
    with torch.no_grad():
        slim(x)
    with tempfile.TemporaryDirectory(prefix="dp-families-") as tmp:
        path = export_onnx(slim, plan.example(), Path(tmp) / "slim.onnx", verify=False)
        diffs = verify_onnx(path, slim)
    with torch.no_grad():  # random weights can give huge logits (inception_v3: ~1e9): the diff is relative to this
        scale = float(slim(probe_inputs(tuple(x.shape[1:]), (1,))[0]).abs().max())
    row.update(parity="pass", parity_max_abs_diff=max(diffs.values()), output_scale=scale)
    m = measure(base, plan, slim, res.plan, timing=timing)
    row.update(speedup=m["speedup"], speedup_low=m["low"], speedup_high=m["high"],
               efficiency=m["speedup"] / info["flops_reduction"], base_ms=m["base_ms"], slim_ms=m["slim_ms"],
               status="ok", seconds=time.perf_counter() - t0,
               detail="" if m["low"] > 1.0 else "NOT FASTER than base (the guard warns)")
    return row


def _child(name: str, out: Path, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    try:
        row = check_one(name, overrides=overrides)
    except Exception as e:  # recorded as the model's error row
        row = {"model": name, "status": "error", "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out.write_text(json.dumps(row))


def run(out: Path, names: list[str], timeout: float, overrides: list[str] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "families.csv"
    done = set()
    if path.is_file():
        with path.open() as f:
            done = {r["model"] for r in csv.DictReader(f)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in names:
        if name in done:
            continue
        tmp = out / f".{name}.json"
        t0 = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-m", "bench.families", "_one", name, str(tmp),
                            *(f"--set={o}" for o in overrides or ())], env=env,
                           timeout=timeout, check=False)
            row = json.loads(tmp.read_text()) if tmp.is_file() else {
                "model": name, "status": "error", "detail": "the child process died without a row"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "detail": f"not finished within {timeout:.0f} s "
                   "on one shared CPU thread"}
        row.setdefault("seconds", time.perf_counter() - t0)
        tmp.unlink(missing_ok=True)
        new = not path.is_file()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in FIELDS})
        print(f"{name}: {row.get('status')} {row.get('speedup', '')} {row.get('detail', '')}", flush=True)
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else v


def _of_scale(r: dict[str, str]) -> str:
    """`` / 1.6e+09`` when the row recorded the output's scale (older rows did not)."""
    return f" / {float(r['output_scale']):.1e}" if r.get("output_scale") else ""


TORCHVISION_TITLE = "Every torchvision classifier at 2x fewer FLOPs"


def render(csv_path: Path, out: Path, command: str, *, name: str = "families",
           title: str = TORCHVISION_TITLE, expected: list[str] | None = None) -> Path:
    """``out/NAME.md`` (+ ``out/NAME.csv``) from a run's CSV; ``expected``: the models the run was
    asked for (default: every torchvision classifier), listed when the run did not reach them."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    seen = {r["model"] for r in rows}
    missing = [m for m in (models() if expected is None else expected) if m not in seen]  # not reached
    ok = [r for r in rows if r["status"] == "ok"]
    eff = sorted(float(r["efficiency"]) for r in ok)
    slower = [r["model"] for r in ok if float(r["speedup_low"]) <= 1.0]
    lines = [f"# {title}", "",
             "Each model (random weights, 10 classes, the input given) is scored by L1 norm, pruned to "
             "2x fewer FLOPs with the defaults (widths rounded by allocation.round_to=auto: 16 on this "
             "AVX-512 CPU; each node's norms divided by their mean for the global ranking, "
             "allocation.normalize=auto; 2 crucial nodes by raw mean norm, plus the last), run in eval "
             "and train mode, exported to ONNX with parity against PyTorch (batch 1 and 7), and "
             "timed against its base on ONNX Runtime CPU, batch 1, one thread, CPU clock, in 12 "
             "interleaved rounds (speedup = geometric mean of paired round ratios, 95% bootstrap "
             "interval). Efficiency = speedup / FLOPs reduction got. Machine: 2 shared CPU cores.", "",
             "```bash", command, "```", "",
             f"{len(rows)} models: {len(ok)} pruned and measured, "
             f"{sum(r['status'] == 'refused' for r in rows)} refused with one line, "
             f"{sum(r['status'] == 'error' for r in rows)} errors, "
             f"{sum(r['status'] == 'timeout' for r in rows)} over the per-model time box"
             + (f"; {len(missing)} not reached before the run's deadline: {', '.join(missing)}. "
                if missing else ". ")
             + (f"Median efficiency {np.median(eff):.2f} (min {eff[0]:.2f}, max {eff[-1]:.2f}). " if eff else "")
             + (f"Not measurably faster than base (the slowdown guard warns): {', '.join(slower)}." if slower
                else "Every measured slim model is faster than its base."), "",
             "| model | status | input | nodes (prunable) | FLOPs asked / got | parity (max abs diff / output scale) "
             "| ORT b1 speedup [95% CI] | efficiency | detail |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | ok | {r['input']} | {r['nodes']} ({r['prunable']}) | "
                         f"{float(r['flops_asked']):.1f} / {float(r['flops_got']):.2f} | pass "
                         f"({float(r['parity_max_abs_diff']):.1e}{_of_scale(r)}) | {float(r['speedup']):.2f} "
                         f"[{float(r['speedup_low']):.2f}, {float(r['speedup_high']):.2f}] | "
                         f"{float(r['efficiency']):.2f} | {r['detail']} |")
        else:
            lines.append(f"| {r['model']} | {r['status']} | {r['input']} | | | | | | "
                         f"{r['detail'].replace('|', '/')} |")
    out.mkdir(parents=True, exist_ok=True)
    page = out / f"{name}.md"
    page.write_text("\n".join(lines) + "\n")
    if csv_path.resolve() != (out / f"{name}.csv").resolve():
        (out / f"{name}.csv").write_text(csv_path.read_text())
    return page


def compare(a_csv: Path, b_csv: Path, labels: tuple[str, str], page: Path, command: str,
            title: str = "Two settings of the family matrix, model by model") -> Path:
    """A page setting two matrix runs side by side (the models measured in both): speedup with
    interval and efficiency per model, and the median efficiency of each."""
    def rows(path: Path) -> dict[str, dict[str, str]]:
        with path.open() as f:
            return {r["model"]: r for r in csv.DictReader(f) if r["status"] == "ok"}

    a, b = rows(a_csv), rows(b_csv)
    both = [m for m in a if m in b]
    if not both:
        raise ValueError(f"{a_csv} and {b_csv} have no measured model in common")
    cell = lambda r: (f"{float(r['flops_got']):.2f}x | {float(r['speedup']):.2f} "  # noqa: E731
                      f"[{float(r['speedup_low']):.2f}, {float(r['speedup_high']):.2f}] | {float(r['efficiency']):.2f}")
    med = [float(np.median([float(rs[m]["efficiency"]) for m in both])) for rs in (a, b)]
    wins = sum(float(a[m]["efficiency"]) > float(b[m]["efficiency"]) for m in both)
    lines = [f"# {title}", "", "Each row: the model pruned to 2x fewer FLOPs (L1 scores, random weights, "
             "64x64 input) and timed against its base on ONNX Runtime CPU, batch 1, one thread, CPU clock, "
             "paired rounds (`python -m bench.families`). Efficiency = measured speedup / FLOPs reduction.",
             "", "```bash", command, "```", "",
             f"{len(both)} models measured under both. Median efficiency: **{labels[0]} {med[0]:.2f}**, "
             f"**{labels[1]} {med[1]:.2f}**; {labels[0]} is ahead on {wins} of {len(both)}.", "",
             f"| model | FLOPs red. ({labels[0]}) | speedup [95% CI] | efficiency | FLOPs red. ({labels[1]}) "
             "| speedup [95% CI] | efficiency |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} | {cell(a[m])} | {cell(b[m])} |" for m in both]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--models", help="comma-separated names (default: every torchvision classifier): bare "
                   "torchvision names (resnet18) or any architecture name (tv.vgg11, timm.resnet26d)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config setting on top of the defaults, repeatable (allocation.round_to=8)")
    d = sub.add_parser("render")
    d.add_argument("csv", type=Path)
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--command", default="python -m bench.families run --out runs/families")
    d.add_argument("--name", default="families", help="page and CSV stem under --out (default families)")
    d.add_argument("--title", default=TORCHVISION_TITLE)
    d.add_argument("--models", help="comma-separated models the run was asked for (default: every "
                   "torchvision classifier); those without a row are listed as not reached")
    ls = sub.add_parser("list", help="print model names, one a line")
    ls.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    ls.add_argument("--pattern", default="*", help="timm name pattern, e.g. 'resnet*'")
    c = sub.add_parser("compare", help="two runs' CSVs side by side on one page")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--labels", nargs=2, default=("A", "B"))
    c.add_argument("--page", required=True, type=Path)
    c.add_argument("--title", default="Two settings of the family matrix, model by model")
    c.add_argument("--command", default="python -m bench.families run ...")
    o = sub.add_parser("_one")
    o.add_argument("name")
    o.add_argument("json", type=Path)
    o.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.cmd == "run":
        names = args.models.split(",") if args.models else models()
        print(run(args.out, names, args.timeout, args.overrides))
    elif args.cmd == "render":
        print(render(args.csv, args.out, args.command, name=args.name, title=args.title,
                     expected=args.models.split(",") if args.models else None))
    elif args.cmd == "list":
        if args.zoo == "torchvision":
            print("\n".join(models()))
        else:
            from deploy_prune.models import zoo

            if zoo._timm() is None:
                print(zoo.missing_message("timm.*"), file=sys.stderr)
                return 2
            print("\n".join(zoo.cnn_names(args.pattern)))
    elif args.cmd == "compare":
        try:
            print(compare(args.a, args.b, tuple(args.labels), args.page, args.command, args.title))
        except (ValueError, OSError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        _child(args.name, args.json, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
