"""The Fashion-MNIST accuracy table (docs/results/fashion_accuracy.md): top-1 of the artifacts
actually timed next to their measured speedups.

``deploy-prune bench fashion-accuracy --entry LABEL BENCH_DIR RUN_DIR CONFIG ... --out DIR``; the
study itself is :mod:`bench.studies.fashion_accuracy.study` (loaded only when it runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "Join bench --accuracy results with their runs' reports."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entry", nargs=4, action="append", required=True,
                   metavar=("LABEL", "BENCH_DIR", "RUN_DIR", "CONFIG"), help="one trained pair")
    p.add_argument("--notes", type=Path, help="Markdown appended to the page (commands, budgets)")
    p.add_argument("--out", type=Path, required=True, help="where fashion_accuracy.csv/.md go")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench fashion-accuracy`` (entry point ``deploy_prune.bench_actions``)."""
    p = sub.add_parser("fashion-accuracy", help="top-1 of the timed artifacts next to their speedups "
                       "(docs/results/fashion_accuracy.md)", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bench.studies.fashion_accuracy.study import write_page  # pandas: only to run

    return write_page(args)
