"""The paper-claims suite (``deploy-prune bench suite``): the papers' operating points, measured.

``config`` (the suite YAML), ``models`` (base and slim model directories per operating point),
``suite`` (plan, cache and time the units), ``report`` (the results page, CSV and plot) and
``readme`` (the README's tables generated from the committed CSV).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench suite CONFIG [key=value ...] --out DIR [--results DIR] [--data-root DIR]``."""
    p = sub.add_parser("suite", help="build the papers' operating points and measure them",
                       description="Build ImageNet-shape base and slim models at the operating points "
                       "of CONFIG (random weights; widths from beta scores with --data-root, else "
                       "uniform) and time slim against base per stage, rounding and point. Model "
                       "directories and finished units are cached under --out; a rerun resumes "
                       "(and retries units that timed nothing, e.g. GPU stages on a CPU box).",
                       epilog="Example: deploy-prune bench suite configs/bench/paper_claims.yaml "
                       "--out runs/paper_claims --results docs/results")
    p.add_argument("config", metavar="CONFIG", help="suite YAML (configs/bench/paper_claims.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (budget_minutes=30)")
    p.add_argument("--out", dest="suite_out", required=True, metavar="DIR",
                   help="work directory: models, artifacts, per-unit CSVs")
    p.add_argument("--results", metavar="DIR", help="where paper_claims.csv/.md/.png go (default: --out)")
    p.add_argument("--data-root", dest="data_root", metavar="DIR",
                   help="ImageNet folder (train/, val/): widths from beta scores")
    p.add_argument("--notes", metavar="FILE", help="Markdown added to the page (how a split run was produced)")
    p.add_argument("--build-workers", type=int, default=1, metavar="N",
                   help="processes building models ahead of the measurements (0: build inline)")
    p.set_defaults(func=_cmd_suite)


def _cmd_suite(args) -> int:
    from bench.studies.paper_claims.suite import (
        cmd_suite,  # pandas, models, allocators: only to run
    )

    return cmd_suite(args)
