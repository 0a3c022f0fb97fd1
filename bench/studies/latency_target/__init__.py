"""The latency-target study (docs/results/latency_target.md): does the additive latency model
hold, and which FLOPs target measures the same speedup as a latency-targeted allocation?

``deploy-prune bench latency-target --run DIR [--speedup 2.0] --out FILE.csv``; the study itself
is :mod:`bench.studies.latency_target.study` (loaded only when it runs).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a deploy-prune run directory (latency-targeted)")
    p.add_argument("--out", required=True, help="CSV of the study rows")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--lo", type=float, default=1.5, help="FLOPs reduction bracket, low end")
    p.add_argument("--hi", type=float, default=6.0, help="FLOPs reduction bracket, high end")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--additive", type=int, default=8, help="random selections for the additive check")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench latency-target`` (entry point ``deploy_prune.bench_actions``)."""
    p = sub.add_parser("latency-target", help="check the additive latency model and match a "
                       "latency-targeted run with a FLOPs target (docs/results/latency_target.md)",
                       description="On the backend a latency-targeted run used: predicted vs measured "
                       "latency of random grid widths, then the FLOPs reduction whose allocation "
                       "measures the same speedup (bisection). Writes tidy CSV rows.")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bench.studies.latency_target.study import run_study  # pandas and the probe: only to run

    return run_study(args)
