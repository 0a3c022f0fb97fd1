"""Latency tables: per prunable node, the measured model latency as that node's width varies.

Model (validated in docs/results/latency_target.md): latency is additive in per-node deltas,
``t(k_1, ..., k_n) ~= base + sum_i (t_i(k_i) - base)``, where ``t_i(k)`` is the latency with
node ``i`` at ``k`` channels and every other node at full width. The allocator corrects what
the additive model misses (the coupling of consecutive convolutions) with a closing
measurement.

A table is JSON, cached under ``$DEPLOY_PRUNE_CACHE/latency`` (default
``~/.cache/deploy-prune/latency``) and keyed by what makes a latency valid: device name,
backend, device, precision, batch, threads, clock, library versions, the base model's plan
hash and the grid. A table whose key differs from the one wanted is refused with the fields
that differ.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.env import library_versions, now
from bench.latency.probe import Probe, device_name
from deploy_prune.allocation import min_keep, resolve_round_to
from deploy_prune.artifacts import atomic_write_text, read_json_object
from deploy_prune.config import AllocationConfig
from deploy_prune.nodes import Node
from deploy_prune.progress import progress

log = logging.getLogger(__name__)
TABLE_FORMAT = "deploy-prune/latency-table@1"
VERSION_KEYS = ("deploy_prune", "python", "torch", "onnx", "onnxruntime", "onnxruntime-gpu",
                "tensorrt", "cuda_runtime")


class StaleTableError(ValueError):
    """A latency table measured for another device, backend, library stack or model."""


def grid_widths(channels: int, cfg: AllocationConfig) -> list[int]:
    """Up to ``cfg.grid`` kept counts: multiples of ``round_to`` from the floor to full width."""
    step = max(1, resolve_round_to(cfg.round_to, cfg.device))
    lo = min(channels, math.ceil(min_keep(channels, cfg) / step) * step)
    widths = sorted({*range(lo, channels + 1, step), channels})
    if len(widths) <= cfg.grid:
        return widths
    idx = np.unique(np.linspace(0, len(widths) - 1, max(cfg.grid, 2)).round().astype(int))
    return [widths[i] for i in idx]


def table_key(probe: Probe, nodes: list[Node], cfg: AllocationConfig) -> dict[str, Any]:
    """Everything a table's numbers depend on; two tables are interchangeable iff keys match."""
    v = library_versions()
    return {**probe.describe(), "versions": {k: v[k] for k in VERSION_KEYS if k in v},
            "base_sha256": probe.plan.digest(), "nodes": sorted(n.name for n in nodes),
            "grid": cfg.grid, "round_to": resolve_round_to(cfg.round_to, cfg.device), "min_channels": cfg.min_channels,
            "min_fraction": cfg.min_fraction}


@dataclass
class LatencyTable:
    """``widths[node][j]`` channels give ``ms[node][j]`` (others at full width); base at ``base_ms``."""

    key: dict[str, Any]
    base_ms: float
    widths: dict[str, list[int]]
    ms: dict[str, list[float]]
    seconds: float = 0.0
    created: str = field(default_factory=now)

    def delta(self, node: str) -> list[float]:
        """Latency added (ms, negative: saved) at each grid width of ``node``."""
        return [t - self.base_ms for t in self.ms[node]]

    def predict(self, widths: Mapping[str, int]) -> float:
        """Additive prediction (ms) for per-node widths on the grid (nodes absent: full width)."""
        total = self.base_ms
        for node, k in widths.items():
            if node in self.widths:
                total += self.ms[node][self.widths[node].index(k)] - self.base_ms
        return total

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "key": self.key, "base_ms": self.base_ms, "seconds": self.seconds,
                "created": self.created,
                "nodes": {n: {"widths": self.widths[n], "ms": self.ms[n]} for n in self.widths}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "table") -> LatencyTable:
        if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
            raise ValueError(f"{source}: not a deploy-prune latency table (format {TABLE_FORMAT})")
        nodes = data["nodes"]
        return cls(key=dict(data["key"]), base_ms=float(data["base_ms"]), seconds=float(data["seconds"]),
                   created=str(data["created"]), widths={n: list(v["widths"]) for n, v in nodes.items()},
                   ms={n: [float(x) for x in v["ms"]] for n, v in nodes.items()})


def check_key(found: Mapping[str, Any], wanted: Mapping[str, Any], *, source: str) -> None:
    """Refuse a table whose key differs from ``wanted``; the message names each differing field."""
    diff = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
    if diff:
        lines = "; ".join(f"{k}: table has {found.get(k)!r}, this run needs {wanted.get(k)!r}" for k in diff)
        raise StaleTableError(f"{source} is a latency table for another setting ({lines}); "
                              "its numbers do not apply here: delete it or let it be rebuilt")


def load_table(path: str | Path, wanted: Mapping[str, Any]) -> LatencyTable:
    """Read a table and check it was measured for ``wanted`` (else :class:`StaleTableError`)."""
    path = Path(path)
    data = read_json_object(path)
    try:
        table = LatencyTable.from_json(data, source=str(path))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt latency table ({e})") from None
    check_key(table.key, wanted, source=str(path))
    return table


def cache_path(key: Mapping[str, Any]) -> Path:
    """Where the table for ``key`` is cached (one file per model/backend/device/precision/batch)."""
    root = Path(os.environ.get("DEPLOY_PRUNE_CACHE", Path.home() / ".cache" / "deploy-prune"))
    name = f"{key['base_sha256'][:16]}-{key['backend']}-{key['device']}-{key['precision']}-b{key['batch']}.json"
    return root / "latency" / name


def build_table(probe: Probe, nodes: list[Node], cfg: AllocationConfig) -> LatencyTable:
    """Measure every grid width of every node in ``nodes`` (others at full width)."""
    t0 = time.perf_counter()
    widths = {n.name: grid_widths(n.channels, cfg) for n in nodes}
    jobs = [(n, k) for n in nodes for k in widths[n.name]]
    ms: dict[str, list[float]] = {n.name: [] for n in nodes}
    bar = progress(jobs, desc=f"latency table ({probe.backend_name}/{probe.device}, b{probe.batch})", unit="pt")
    for node, k in bar:
        ms[node.name].append(probe.base_ms if k == node.channels else
                             probe.latency({node.name: list(range(k))}))
        bar.set_postfix(node=node.name, k=k, ms=f"{ms[node.name][-1]:.3f}")
    seconds = time.perf_counter() - t0
    log.info("latency table: %d points on %s in %.1fs (base %.3f ms)", len(jobs), device_name(probe.device),
             seconds, probe.base_ms)
    return LatencyTable(key=table_key(probe, nodes, cfg), base_ms=probe.base_ms, widths=widths, ms=ms,
                        seconds=seconds)


def cached_table(probe: Probe, nodes: list[Node], cfg: AllocationConfig, *,
                 path: str | Path | None = None) -> LatencyTable:
    """The cached table for this setting, or a freshly built (and cached) one.

    A cached file for another setting (device, versions, model, grid) is refused with its reason
    logged, then replaced by a new measurement.
    """
    wanted = table_key(probe, nodes, cfg)
    path = Path(path) if path else cache_path(wanted)
    if path.is_file():
        try:
            table = load_table(path, wanted)
            log.info("latency table: reusing %s (built %s)", path, table.created)
            return table
        except ValueError as e:  # StaleTableError included
            log.warning("refusing %s and rebuilding: %s", path, e)
    table = build_table(probe, nodes, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table.to_json(), indent=1))
    return table
