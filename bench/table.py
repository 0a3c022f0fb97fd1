"""The one tidy results table: a row per (model variant, backend, device, precision, batch).

Written as ``results.csv`` and ``results.json`` (a JSON list of row objects, NaN as null); the
Markdown report and the plots are rendered from the same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from deploy_prune.artifacts import atomic_write_text

KEY = ("model", "backend", "device", "precision", "batch")  # how bench compare matches rows
REQUIRED = (
    "model", "variant", "backend", "device", "precision", "batch",
    "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips",
    "flops", "flops_reduction", "speedup", "speedup_ci_low", "speedup_ci_high", "efficiency",
)
EXTRA = (
    "top1", "top1_samples", "accuracy_error", "status", "error",
    "std_ms", "min_ms", "max_ms", "samples", "rounds", "calls_per_round",
    "device_p50_ms", "device_mean_ms", "device_speedup", "device_speedup_ci_low",
    "device_speedup_ci_high", "params", "confidence", "clock",
    "threads", "channels_last", "compile_mode", "providers", "artifact", "model_dir",
    "plan_sha256", "cpu_model", "load_avg_1m", "gpu_name", "gpu_driver", "cuda_driver",
    "cuda_runtime", "gpu_sm_clock_mhz", "gpu_sm_clock_max_mhz", "gpu_mem_clock_mhz",
    "gpu_temp_c", "gpu_power_w", "gpu_throttle_reasons", "torch_version", "onnxruntime_version",
    "timestamp",
)
COLUMNS = REQUIRED + EXTRA


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with every column of :data:`COLUMNS` first (missing ones empty)."""
    df = pd.DataFrame(list(rows))
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = math.nan
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The table as a list of plain row dicts (the ``results.json`` format)."""
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def write(df: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """``OUT/results.csv`` and ``OUT/results.json``, each written atomically."""
    out = Path(out)
    csv = atomic_write_text(out / "results.csv", df.to_csv(index=False))
    js = atomic_write_text(out / "results.json", json.dumps(records(df), indent=1) + "\n")
    return csv, js


def read(path: str | Path) -> pd.DataFrame:
    """A results table from ``results.json`` (list of rows) or ``results.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    if path.suffix == ".csv":
        return to_frame(pd.read_csv(path).to_dict(orient="records"))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of row objects (a bench results.json)")
    return to_frame(data)
