"""The measured comparison of docs/results/latency_target.md.

``deploy-prune bench latency-target --run DIR [--speedup 2.0] --out FILE.csv`` takes a finished
(or pruned) ``deploy-prune run`` directory and, on the backend its latency allocation used:

- validates the additive latency model: predicted vs measured latency of random grid widths;
- finds the FLOPs reduction whose FLOPs-targeted allocation (same scores, same crucial nodes)
  measures the same speedup, by bisection on measured speedup.

Rows are tidy (one measurement each) and written as CSV.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.latency.latency_table import cached_table
from bench.latency.probe import CHECK, Probe
from bench.studies.latency_target import add_arguments
from deploy_prune import pipeline
from deploy_prune.allocation import allocate, prunable_nodes
from deploy_prune.artifacts import atomic_write_text, load_model_dir, read_plan
from deploy_prune.config import AllocationConfig, RunConfig, from_dict
from deploy_prune.nodes import Node, discover

log = logging.getLogger(__name__)


def additive_check(probe: Probe, table: Any, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Predicted vs measured ms for ``n`` random grid selections (all prunable nodes narrowed)."""
    rng = np.random.default_rng(seed)
    rows = []
    scale = probe.base_ms / table.base_ms
    for i in range(n):
        widths = {node: int(rng.choice(w)) for node, w in table.widths.items()}
        kept = {node: list(range(k)) for node, k in widths.items()}
        rows.append({"study": "additive", "case": i, "widths": widths,
                     "predicted_ms": scale * table.predict(widths),
                     "measured_ms": probe.latency(kept, timing=CHECK), "base_ms": probe.base_ms})
    return rows


def match_flops(probe: Probe, model: Any, plan: Any, cfg: RunConfig, scores: Any, crucial: list[str], *,
                nodes: list[Node], speedup: float, lo: float, hi: float, steps: int) -> list[dict[str, Any]]:
    """Bisection on the FLOPs reduction so that the measured speedup meets ``speedup``."""
    example = plan.example()
    rows = []
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        acfg: AllocationConfig = replace(cfg.allocation, target="flops", flops_reduction=mid)
        alloc = allocate(model, nodes, scores, example, crucial=crucial, cfg=acfg)
        measured = probe.speedup(alloc.plan, timing=CHECK)
        rows.append({"study": "flops_match", "flops_target": mid, "flops_reduction": alloc.flops_reduction,
                     "measured_speedup": measured, "widths": {n.name: alloc.counts[n.name] for n in nodes}})
        log.info("flops target %.3fx -> %.3fx FLOPs, measured speedup %.3fx", mid, alloc.flops_reduction,
                 measured)
        lo, hi = (mid, hi) if measured < speedup else (lo, mid)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_study(p.parse_args(argv))


def run_study(args: argparse.Namespace) -> int:
    """The study for parsed options (``deploy-prune bench latency-target`` or ``main``)."""
    run = Path(args.run)
    model, plan = load_model_dir(run / "base")
    pruned = read_plan(run / "pruned")  # its config and crucial nodes; no weights needed
    cfg = from_dict(RunConfig, pruned.info["config"])
    scores = pipeline.read_scores(run / "scores.json", plan)
    crucial = pruned.info["crucial_nodes"]
    a = cfg.allocation
    all_nodes = discover(model, plan.example())
    nodes = prunable_nodes(all_nodes, crucial)
    with Probe(model, plan, backend=a.backend, device=a.device, precision=a.precision, batch=a.batch) as probe:
        table = cached_table(probe, nodes, a)
        rows = additive_check(probe, table, n=args.additive, seed=0)
        rows += match_flops(probe, model, plan, cfg, scores, crucial, nodes=all_nodes, speedup=args.speedup,
                            lo=args.lo, hi=args.hi, steps=args.steps)
        env = probe.describe()
    df = pd.DataFrame([{**r, **env} for r in rows])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, df.to_csv(index=False))
    print(df.drop(columns=list(env)).to_string())
    return 0


if __name__ == "__main__":
    main()
