"""``deploy-prune bench``: measure a slim model against its base; ``bench compare``: gate on it.

Registered through the ``deploy_prune.commands`` entry point (``bench = "bench.cli:register"``).
``bench`` takes an optional ACTION word: none runs the benchmark; ``compare`` checks a result
against a baseline. More actions register in :data:`ACTIONS` (a function that adds one
sub-parser), or, for a study such as ``bench suite`` (:mod:`bench.studies.paper_claims`), through
the ``deploy_prune.bench_actions`` entry-point group, so bench never imports its studies.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.backends import BACKENDS, DEVICES, PRECISIONS
from deploy_prune._registry import Registry
from deploy_prune.artifacts import check_output

if TYPE_CHECKING:
    import pandas as pd

    from bench.sweep import BenchConfig
    from bench.timing import TimingConfig

log = logging.getLogger(__name__)

ACTIONS: Registry[Callable[[argparse._SubParsersAction], None]] = Registry("bench action")


@dataclass(frozen=True)
class Option:
    """One option of the benchmark run, declared once: the parser, the reproducing command line
    (:func:`command_line`) and the timing config (:func:`config_from_args`) all read it here."""

    flag: str
    group: str
    kwargs: dict[str, Any]
    shown: str = "changed"  # in the command line: always | changed (differs from default) | never
    timing: str | None = None  # the TimingConfig field it sets

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest", self.flag.lstrip("-").replace("-", "_"))


_WHAT, _TIME, _ACC = "what to measure", "timing budget", "accuracy"
RUN_OPTIONS: tuple[Option, ...] = (
    Option("--base", _WHAT, dict(metavar="DIR", help="the unpruned model directory"), "always"),
    Option("--slim", _WHAT, dict(metavar="DIR", help="the pruned model directory"), "always"),
    Option("--backends", _WHAT, dict(nargs="+", default=["torch", "ort"], choices=BACKENDS.names(), metavar="NAME",
                                     help=f"backends ({', '.join(BACKENDS.names())}); default: torch ort"), "always"),
    Option("--device", _WHAT, dict(nargs="+", default=["cpu"], choices=DEVICES, help="default: cpu"), "always"),
    Option("--precision", _WHAT, dict(nargs="+", default=["fp32"], choices=PRECISIONS,
                                      help="default: fp32; int8 is TensorRT only (calibrated on the model's dataset)"),
           "always"),
    Option("--batch", _WHAT, dict(nargs="+", type=int, default=[1, 8], metavar="B", help="default: 1 8"), "always"),
    Option("--out", _WHAT, dict(metavar="DIR", help="where results.csv/json, report.md and plots go"), "always"),
    Option("--name", _WHAT, dict(metavar="LABEL", help="the 'model' column (default: the slim model's arch)")),
    Option("--force", _WHAT, dict(action="store_true", help="overwrite existing results in --out"), "never"),
    Option("--warmup", _TIME, dict(type=float, default=0.5, metavar="S", help="warm-up seconds (default 0.5)"),
           "always", timing="warmup_s"),
    Option("--warmup-iters", _TIME, dict(type=int, default=10, metavar="N", help="warm-up calls at least (10)"),
           timing="warmup_iters"),
    Option("--min-time", _TIME, dict(type=float, default=2.0, metavar="S",
                                     help="timed seconds per model and configuration (default 2.0)"),
           "always", timing="min_time_s"),
    Option("--rounds", _TIME, dict(type=int, default=30, metavar="N", help="interleaved rounds (default 30)"),
           "always", timing="rounds"),
    Option("--min-samples", _TIME, dict(type=int, default=200, metavar="N",
                                        help="timed calls per model at least, for p99 (default 200)"),
           "always", timing="min_samples"),
    Option("--seed", _TIME, dict(type=int, default=0, help="input and bootstrap seed (default 0)"), "always"),
    Option("--threads", _TIME, dict(type=int, default=1, metavar="N", help="CPU threads, pinned (default 1, as "
                                    "torch.utils.benchmark; 0: every usable core)")),
    Option("--clock", _TIME, dict(choices=("wall", "cpu"), default="wall",
                                  help="wall: host wall clock (default); cpu: process CPU time, which ignores "
                                  "time lost to other jobs on a shared machine (needs --threads 1, --device cpu)"),
           timing="clock"),
    Option("--channels-last", _TIME, dict(action="store_true", help="torch/compile: NHWC memory format")),
    Option("--compile-mode", _TIME, dict(default="default", help="torch.compile mode; 'reduce-overhead' uses "
                                         "CUDA graphs (default: default)")),
    Option("--confidence", _TIME, dict(type=float, default=0.95, help="interval level (default 0.95)")),
    Option("--bootstrap", _TIME, dict(type=int, default=2000, metavar="N", help="bootstrap resamples (2000)")),
    Option("--max-eval-samples", _ACC, dict(type=int, metavar="N", help="cap the evaluation set (implies --accuracy)")),
    Option("--accuracy", _ACC, dict(action="store_true", help="top-1 of each benchmarked artifact")),
    Option("--data-root", _ACC, dict(metavar="DIR", help="where the dataset lives (data.root)")),
)
_PARSER_ORDER = ("--base", "--slim", "--out", "--backends", "--device", "--precision", "--batch", "--name",
                 "--force", "--warmup", "--warmup-iters", "--min-time", "--rounds", "--min-samples", "--threads",
                 "--clock", "--channels-last", "--compile-mode", "--confidence", "--bootstrap", "--seed",
                 "--accuracy", "--max-eval-samples", "--data-root")  # the order --help lists them in


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of the benchmark run itself (``deploy-prune bench --base ... --slim ...``)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    by_flag = {o.flag: o for o in RUN_OPTIONS}
    for flag in _PARSER_ORDER:
        o = by_flag[flag]
        g = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        g.add_argument(o.flag, **o.kwargs)


def timing_from_args(args: argparse.Namespace) -> TimingConfig:
    """The :class:`bench.timing.TimingConfig` of the timing options (``min_per_round``: default)."""
    from bench.timing import TimingConfig

    return TimingConfig(**{o.timing: getattr(args, o.dest) for o in RUN_OPTIONS if o.timing})


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`bench.sweep.BenchConfig` the options describe."""
    from bench.sweep import BenchConfig

    return BenchConfig(backends=tuple(args.backends), devices=tuple(args.device),
                       precisions=tuple(args.precision), batches=tuple(args.batch),
                       threads=args.threads or None, channels_last=args.channels_last, compile_mode=args.compile_mode,
                       timing=timing_from_args(args),
                       accuracy=args.accuracy or args.max_eval_samples is not None,
                       max_eval_samples=args.max_eval_samples, data_root=args.data_root,
                       confidence=args.confidence, n_boot=args.bootstrap, seed=args.seed,
                       model_name=args.name)


def _shown(o: Option, args: argparse.Namespace) -> list[str]:
    value = getattr(args, o.dest)
    flag_only = o.kwargs.get("action") == "store_true"
    if o.shown == "never" or (o.shown == "changed" and value == o.kwargs.get("default", False if flag_only else None)):
        return []
    if o.flag == "--accuracy" and args.max_eval_samples:  # implied by --max-eval-samples
        return []
    if flag_only:
        return [o.flag]
    return [o.flag, *map(str, value)] if isinstance(value, list) else [o.flag, str(value)]


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (written into report.md): every option
    marked ``always``, then those that differ from their default, in :data:`RUN_OPTIONS` order."""
    return shlex.join(["deploy-prune", "bench", *(x for o in RUN_OPTIONS for x in _shown(o, args))])


def summary_lines(df: pd.DataFrame) -> list[str]:
    """One line per slim row: latencies, speedup with interval, FLOPs reduction, efficiency."""
    lines = []
    for _, r in df[df["status"] == "ok"].iterrows():
        if r["variant"] != "slim":
            continue
        base = df[(df["variant"] == "base") & (df["backend"] == r["backend"]) & (df["device"] == r["device"])
                  & (df["precision"] == r["precision"]) & (df["batch"] == r["batch"])]
        b50 = base["p50_ms"].iloc[0] if len(base) else float("nan")
        lines.append(f"{r['backend']:<9} {r['device']:<4} {r['precision']:<5} batch {r['batch']:>4}: "
                     f"p50 {b50:.3f} -> {r['p50_ms']:.3f} ms, speedup {r['speedup']:.3f}x "
                     f"[{r['speedup_ci_low']:.3f}, {r['speedup_ci_high']:.3f}], FLOPs "
                     f"{r['flops_reduction']:.2f}x, efficiency {r['efficiency']:.2f}")
    for _, r in df[df["status"] != "ok"].drop_duplicates(["backend", "device", "precision", "error"]).iterrows():
        lines.append(f"{r['backend']:<9} {r['device']:<4} {r['precision']:<5} {r['status']}: {r['error']}")
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the sweep and print a short summary; the table goes to --out."""
    from bench.sweep import run

    missing = [f"--{k}" for k in ("base", "slim", "out") if not getattr(args, k)]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or an action: {', '.join(ACTIONS.names())})")
    for k in ("base", "slim"):
        if not Path(getattr(args, k)).is_dir():
            raise FileNotFoundError(f"--{k} {getattr(args, k)}: no such model directory")
    out = Path(args.out)
    check_output(out / "results.json", force=args.force)
    df = run(args.base, args.slim, out, config_from_args(args), command=command_line(args))
    print("\n".join(summary_lines(df)))
    print(f"{len(df)} rows -> {out / 'results.csv'}, {out / 'results.json'}, {out / 'report.md'}")
    return 0


@ACTIONS.register("compare")
def add_compare(sub: argparse._SubParsersAction) -> None:
    """``bench compare CURRENT --baseline BASELINE [--tolerance T] [--within-interval]``."""
    p = sub.add_parser("compare", help="exit 1 when a speedup regressed against a baseline "
                       "(or, with --within-interval, when a rerun does not reproduce it)",
                       description="Match slim rows by (model, backend, device, precision, batch), "
                       "plus (operating_point, rounding) for suite tables. Default: a row regressed "
                       "when its speedup CI upper bound < (1 - tolerance) x the baseline's speedup. "
                       "--within-interval: a row fails when its speedup lies outside the baseline's "
                       "95% interval (widened by tolerance each side). Baseline rows without an ok "
                       "current row fail too.",
                       epilog="Examples: deploy-prune bench compare out/results.json --baseline "
                       "bench/baselines/cpu-small_vgg-ci.json;  deploy-prune bench compare "
                       "runs/rerun/paper_claims.csv --baseline docs/results/paper_claims.csv "
                       "--within-interval")
    p.add_argument("current", metavar="CURRENT.json", help="results.json (or .csv) of this run")
    p.add_argument("--baseline", required=True, metavar="BASELINE.json", help="the reference results")
    p.add_argument("--tolerance", type=float, default=None, metavar="T",
                   help="allowed relative shortfall (default 0.05; with --within-interval, how much "
                   "to widen the baseline interval, default 0)")
    p.add_argument("--within-interval", action="store_true",
                   help="reproduction check: each speedup must fall inside the baseline's interval")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the verdicts; exit 1 when a row failed (regressed, outside or missing), else 0."""
    from bench import table
    from bench.compare import compare, format_comparison

    mode = "interval" if args.within_interval else "regression"
    tolerance = args.tolerance if args.tolerance is not None else (0.0 if args.within_interval else 0.05)
    result = compare(table.read(args.current), table.read(args.baseline), tolerance=tolerance, mode=mode)
    print(format_comparison(result))
    n = len(result.failures)
    ok = "inside the baseline's intervals" if args.within_interval else f"within tolerance {tolerance}"
    print(f"bench compare: {n} of {len(result.verdicts)} rows failed" if n else
          f"bench compare: all {len(result.verdicts)} rows {ok}",
          file=sys.stderr if n else sys.stdout)
    return 1 if n else 0


@ACTIONS.register("explain")
def add_explain(sub: argparse._SubParsersAction) -> None:
    """``bench explain --base DIR --slim DIR --backend B --out OUT``: per-layer time, base vs slim."""
    p = sub.add_parser("explain", help="where the time went, layer by layer, base against slim",
                       description="Time slim against base (paired rounds), profile both with the "
                       "backend's own profiler (ONNX Runtime profiling, torch.profiler, TensorRT "
                       "IProfiler), map every profiled op to deploy-prune's nodes (conv + its "
                       "BN/activation) or a named row (pooling, classifier, layout reorders, copies, "
                       "overhead), and write OUT/explain.csv, explain.json, explain.png and report.md "
                       "with a diagnosis: layers that lost FLOPs but not time, layout time, widths off "
                       "the backend's preferred multiple (with the rounded widths timed), and the "
                       "speedup ceiling set by per-call overhead.",
                       epilog="Example: deploy-prune bench explain --base runs/x/base --slim runs/x/slim "
                       "--backend ort --out runs/x/explain-ort")
    p.add_argument("--base", dest="explain_base", required=True, metavar="DIR", help="the unpruned model directory")
    p.add_argument("--slim", dest="explain_slim", required=True, metavar="DIR", help="the pruned model directory")
    p.add_argument("--out", dest="explain_out", required=True, metavar="DIR", help="where the table and report go")
    p.add_argument("--backend", default="ort", choices=("ort", "torch", "tensorrt", "compile"),
                   help="whose profiler: ort (default), torch (eager), tensorrt (CUDA)")
    p.add_argument("--device", dest="explain_device", default="cpu", choices=DEVICES, help="default: cpu")
    p.add_argument("--precision", dest="explain_precision", default="fp32", choices=PRECISIONS,
                   help="default: fp32")
    p.add_argument("--batch", dest="explain_batch", type=int, default=1, metavar="N", help="default: 1")
    p.add_argument("--threads", dest="explain_threads", type=int, default=1, metavar="N", help="default: 1")
    p.add_argument("--clock", dest="explain_clock", choices=("wall", "cpu"), default=None,
                   help="paired timing clock (default: cpu on --device cpu with 1 thread, else wall)")
    p.add_argument("--calls", type=int, default=20, metavar="N", help="profiled calls per model (20)")
    p.add_argument("--profile-warmup", type=int, default=3, metavar="N", help="unprofiled warm-up calls before profiling (3)")
    p.add_argument("--rounds", dest="explain_rounds", type=int, default=10, metavar="N",
                   help="interleaved rounds of the paired timing (10)")
    p.add_argument("--min-time", dest="explain_min_time", type=float, default=1.5, metavar="S",
                   help="timed seconds per model in the paired timing (1.5)")
    p.add_argument("--min-samples", dest="explain_min_samples", type=int, default=40, metavar="N",
                   help="timed calls per model at least (40)")
    p.add_argument("--tolerance", dest="explain_tolerance", type=float, default=0.15, metavar="F",
                   help="profiled vs measured totals agree when within this fraction (0.15)")
    p.add_argument("--probe", choices=("combined", "none"), default="combined",
                   help="combined: time the slim at the recommended rounded widths (default); none: skip")
    p.add_argument("--name", dest="explain_name", metavar="LABEL", help="model label (default: the arch)")
    p.add_argument("--force", dest="explain_force", action="store_true", help="overwrite OUT/explain.json")
    p.set_defaults(func=cmd_explain)


def explain_command(args: argparse.Namespace, clock: str) -> str:
    parts = ["deploy-prune", "bench", "explain", "--base", args.explain_base, "--slim", args.explain_slim,
             "--backend", args.backend, "--device", args.explain_device, "--precision", args.explain_precision,
             "--batch", str(args.explain_batch), "--threads", str(args.explain_threads), "--clock", clock,
             "--calls", str(args.calls), "--rounds", str(args.explain_rounds), "--min-time",
             str(args.explain_min_time), "--min-samples", str(args.explain_min_samples), "--out", args.explain_out]
    parts += ["--probe", "none"] if args.probe == "none" else []
    return shlex.join(parts)


def cmd_explain(args: argparse.Namespace) -> int:
    """Profile, map and diagnose one pair; print the diagnosis."""
    from bench.explain import ExplainConfig, explain
    from bench.explain_report import diagnosis_lines
    from bench.timing import TimingConfig

    for k in ("explain_base", "explain_slim"):
        if not Path(getattr(args, k)).is_dir():
            raise FileNotFoundError(f"--{k.split('_')[1]} {getattr(args, k)}: no such model directory")
    out = Path(args.explain_out)
    check_output(out / "explain.json", force=args.explain_force)
    clock = args.explain_clock or ("cpu" if args.explain_device == "cpu" and args.explain_threads == 1 else "wall")
    timing = TimingConfig(warmup_s=0.3, warmup_iters=3, min_time_s=args.explain_min_time,
                          rounds=args.explain_rounds, min_samples=args.explain_min_samples,
                          min_per_round=1, clock=clock)
    cfg = ExplainConfig(backend=args.backend, device=args.explain_device, precision=args.explain_precision,
                        batch=args.explain_batch, threads=args.explain_threads, clock=clock, calls=args.calls,
                        warmup=args.profile_warmup, timing=timing, tolerance=args.explain_tolerance,
                        probe=args.probe, name=args.explain_name)
    result = explain(args.explain_base, args.explain_slim, out, cfg, command=explain_command(args, clock))
    print("\n".join(diagnosis_lines(result)).replace("**", "").replace("`", ""))
    print(f"{len(result['rows'])} rows -> {out / 'explain.csv'}, {out / 'explain.json'}, {out / 'report.md'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` (and its actions) to the ``deploy-prune`` command line."""
    p = sub.add_parser("bench", help="latency, throughput, speedup and accuracy of slim vs base",
                       description="Time the slim model against its base in interleaved rounds on "
                       "each backend, device, precision and batch size; write OUT/results.csv, "
                       "OUT/results.json, OUT/report.md and plots.",
                       epilog="Example: deploy-prune bench --base runs/x/base --slim runs/x/slim "
                       "--backends torch ort --device cpu --precision fp32 --batch 1 8 --out bench_out")
    add_run_options(p)
    actions = p.add_subparsers(dest="bench_action", metavar="[ACTION]", required=False)
    for name in ACTIONS.names():
        ACTIONS.get(name)(actions)
    for ep in entry_points(group="deploy_prune.bench_actions"):  # studies measured with bench (suite)
        try:
            add = ep.load()
        except ImportError as e:  # as deploy_prune.cli: a broken plugin must not break bench
            log.debug("bench action plugin %s unavailable: %s", ep.name, e)
            continue
        add(actions)
    p.set_defaults(func=cmd_bench)
