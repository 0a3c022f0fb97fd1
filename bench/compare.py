"""``bench compare``: is a run's speedup worse than a baseline's, beyond noise and tolerance?

The rule, per baseline row that has a speedup (``variant == "slim"``, ``status == "ok"``),
matched to the current run by (model, backend, device, precision, batch)::

    regressed  <=>  current.speedup_ci_high < (1 - tolerance) * baseline.speedup

i.e. even the optimistic end of the current 95% interval lies more than ``tolerance`` below the
speedup the baseline measured. A baseline row with no ``ok`` counterpart in the current run is
``missing`` and fails the comparison too (a gate must not pass because a configuration stopped
running). Rows only in the current run are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.table import KEY

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Verdict:
    """One baseline row against the current run."""

    key: Key
    status: str  # "ok" | "regressed" | "missing"
    baseline: float
    threshold: float
    current: float = math.nan
    current_low: float = math.nan
    current_high: float = math.nan
    same_plan: bool = True  # False: the slim models differ (plan_sha256), a note, not a failure


@dataclass(frozen=True)
class Comparison:
    verdicts: list[Verdict]
    tolerance: float

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status != "ok"]

    @property
    def passed(self) -> bool:
        return not self.failures


def _key(row: pd.Series) -> Key:
    return tuple(int(row[k]) if k == "batch" else str(row[k]) for k in KEY)


def speedup_rows(df: pd.DataFrame, *, what: str) -> dict[Key, pd.Series]:
    """Slim ``ok`` rows by key; a key that appears twice is an error (ambiguous match)."""
    rows: dict[Key, pd.Series] = {}
    slim = df[(df["variant"] == "slim") & (df["status"] == "ok")]
    for _, row in slim.iterrows():
        k = _key(row)
        if k in rows:
            raise ValueError(f"{what}: two rows for {dict(zip(KEY, k))}; cannot match rows")
        rows[k] = row
    return rows


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def judge(key: Key, base: pd.Series, cur: pd.Series | None, tolerance: float) -> Verdict:
    """The verdict for one baseline row (see the module docstring for the rule)."""
    ref = float(base["speedup"])
    threshold = (1.0 - tolerance) * ref
    if cur is None or not _finite(cur["speedup_ci_high"]):
        return Verdict(key, "missing", ref, threshold)
    high = float(cur["speedup_ci_high"])
    shas = {str(r.get("plan_sha256")) for r in (base, cur) if isinstance(r.get("plan_sha256"), str)}
    return Verdict(key, "regressed" if high < threshold else "ok", ref, threshold,
                   current=float(cur["speedup"]), current_low=float(cur["speedup_ci_low"]),
                   current_high=high, same_plan=len(shas) < 2)


def compare(current: pd.DataFrame, baseline: pd.DataFrame, *, tolerance: float = 0.05) -> Comparison:
    """Judge every baseline speedup row against the current run."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    cur = speedup_rows(current, what="current results")
    base = speedup_rows(baseline, what="baseline")
    base = {k: r for k, r in base.items() if _finite(r["speedup"])}
    if not base:
        raise ValueError("the baseline has no slim row with status ok and a speedup to compare against")
    verdicts = [judge(k, r, cur.get(k), tolerance) for k, r in sorted(base.items(), key=lambda kv: str(kv[0]))]
    return Comparison(verdicts=verdicts, tolerance=tolerance)


def format_comparison(c: Comparison) -> str:
    """A readable table of verdicts, then one line per failing row."""
    lines = [f"{'model/backend/device/precision/batch':<44} {'baseline':>8} {'threshold':>9} "
             f"{'current [95% CI]':>24}  verdict"]
    for v in c.verdicts:
        name = "/".join(str(x) for x in v.key)
        cur = "-" if v.status == "missing" else f"{v.current:.3f} [{v.current_low:.3f}, {v.current_high:.3f}]"
        lines.append(f"{name:<44} {v.baseline:>8.3f} {v.threshold:>9.3f} {cur:>24}  {v.status.upper()}")
    for v in c.verdicts:
        if not v.same_plan:
            lines.append(f"NOTE: {dict(zip(KEY, v.key))}: the slim model's plan differs from the "
                         "baseline's (plan_sha256): this compares two different models")
    for v in c.failures:
        what = dict(zip(KEY, v.key))
        if v.status == "missing":
            lines.append(f"MISSING: {what}: no ok speedup row in the current run")
        else:
            lines.append(f"REGRESSED: {what}: CI upper bound {v.current_high:.3f} < "
                         f"{1 - c.tolerance:.2f} x baseline {v.baseline:.3f} = {v.threshold:.3f}")
    return "\n".join(lines)
