"""``bench compare``: is a run's speedup worse than a baseline's, beyond noise and tolerance?

The rule, per baseline row that has a speedup (``variant == "slim"``, ``status == "ok"``),
matched to the current run by (model, backend, device, precision, batch)::

    regressed  <=>  current.speedup_ci_high < (1 - tolerance) * baseline.speedup

i.e. even the optimistic end of the current 95% interval lies more than ``tolerance`` below the
speedup the baseline measured. A baseline row with no ``ok`` counterpart in the current run is
``missing`` and fails the comparison too (a gate must not pass because a configuration stopped
running). Rows only in the current run are ignored.

``--within-interval`` asks another question: does a rerun *reproduce* the baseline? A row passes
when the current speedup lies inside the baseline's 95% interval (widened by ``tolerance`` on
each side, 0 by default)::

    outside  <=>  not (1 - tolerance) * baseline.ci_low <= current.speedup <= (1 + tolerance) * baseline.ci_high

Suite tables (``bench suite``) hold many operating points and roundings per model; when the
baseline has ``operating_point`` / ``rounding`` columns they join the match key.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.table import KEY

Key = tuple[Any, ...]
SUITE_KEY = ("operating_point", "rounding")  # a suite table's rows also differ in these
MODES = ("regression", "interval")


@dataclass(frozen=True)
class Verdict:
    """One baseline row against the current run."""

    key: Key
    status: str  # "ok" | "regressed" (regression mode) | "outside" (interval mode) | "missing"
    baseline: float
    threshold: float  # regression: the lowest passing CI high; interval: the band's low end
    current: float = math.nan
    current_low: float = math.nan
    current_high: float = math.nan
    same_plan: bool = True  # False: the slim models differ (plan_sha256), a note, not a failure
    band_high: float = math.nan  # interval mode: the band's high end

    @property
    def deviation(self) -> float:
        """Current speedup relative to the baseline's, minus 1 (NaN when missing)."""
        return self.current / self.baseline - 1.0


@dataclass(frozen=True)
class Comparison:
    verdicts: list[Verdict]
    tolerance: float
    mode: str = "regression"
    key_columns: tuple[str, ...] = KEY

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status != "ok"]

    @property
    def passed(self) -> bool:
        return not self.failures


def _part(value: Any) -> Any:
    """One key component: whole numbers as int (CSV reads them as float), the rest as str."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and float(value).is_integer():
        return int(value)
    return str(value)


def _key(row: pd.Series, columns: tuple[str, ...] = KEY) -> Key:
    return tuple(_part(row[k]) for k in columns)


def key_columns(current: pd.DataFrame, baseline: pd.DataFrame) -> tuple[str, ...]:
    """KEY, plus the suite columns the baseline fills (which the current run must have too)."""
    slim = baseline[baseline["variant"] == "slim"]
    extra = tuple(c for c in SUITE_KEY if c in slim.columns and slim[c].notna().any())
    lacking = [c for c in extra if c not in current.columns or current[c].isna().all()]
    if lacking:
        raise ValueError(f"the baseline is a suite table (it has {', '.join(extra)}) but the current "
                         f"results have no {', '.join(lacking)} column; compare a suite's "
                         "paper_claims.csv or suite_table.csv against a suite's")
    return KEY + extra


def speedup_rows(df: pd.DataFrame, *, what: str, columns: tuple[str, ...] = KEY) -> dict[Key, pd.Series]:
    """Slim ``ok`` rows by key; a key that appears twice is an error (ambiguous match)."""
    rows: dict[Key, pd.Series] = {}
    slim = df[(df["variant"] == "slim") & (df["status"] == "ok")]
    for _, row in slim.iterrows():
        k = _key(row, columns)
        if k in rows:
            raise ValueError(f"{what}: two rows for {dict(zip(columns, k))}; cannot match rows")
        rows[k] = row
    return rows


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def _same_plan(base: pd.Series, cur: pd.Series) -> bool:
    """False when both rows name their slim model's plan and the hashes differ."""
    shas = {r.get("plan_sha256") for r in (base, cur) if isinstance(r.get("plan_sha256"), str)}
    return len(shas) < 2


def judge(key: Key, base: pd.Series, cur: pd.Series | None, tolerance: float) -> Verdict:
    """The verdict for one baseline row (see the module docstring for the rule)."""
    ref = float(base["speedup"])
    threshold = (1.0 - tolerance) * ref
    if cur is None or not _finite(cur["speedup_ci_high"]):
        return Verdict(key, "missing", ref, threshold)
    high = float(cur["speedup_ci_high"])
    return Verdict(key, "regressed" if high < threshold else "ok", ref, threshold,
                   current=float(cur["speedup"]), current_low=float(cur["speedup_ci_low"]),
                   current_high=high, same_plan=_same_plan(base, cur))


def judge_interval(key: Key, base: pd.Series, cur: pd.Series | None, tolerance: float) -> Verdict:
    """Interval mode: is the current speedup inside the baseline's (widened) 95% interval?"""
    ref = float(base["speedup"])
    if not (_finite(base["speedup_ci_low"]) and _finite(base["speedup_ci_high"])):
        raise ValueError(f"baseline row {key} has no speedup interval (speedup_ci_low/high)")
    low = (1.0 - tolerance) * float(base["speedup_ci_low"])
    high = (1.0 + tolerance) * float(base["speedup_ci_high"])
    if cur is None or not _finite(cur["speedup"]):
        return Verdict(key, "missing", ref, low, band_high=high)
    now = float(cur["speedup"])
    return Verdict(key, "ok" if low <= now <= high else "outside", ref, low, current=now,
                   current_low=float(cur["speedup_ci_low"]), current_high=float(cur["speedup_ci_high"]),
                   same_plan=_same_plan(base, cur), band_high=high)


def compare(current: pd.DataFrame, baseline: pd.DataFrame, *, tolerance: float = 0.05,
            mode: str = "regression") -> Comparison:
    """Judge every baseline speedup row against the current run (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    columns = key_columns(current, baseline)
    cur = speedup_rows(current, what="current results", columns=columns)
    base = speedup_rows(baseline, what="baseline", columns=columns)
    bad = [k for k, r in base.items() if not (_finite(r.get("speedup")) and float(r["speedup"]) > 0)]
    if bad:  # a baseline of 0 or -5 would pass every row: refuse it rather than pass
        k = bad[0]
        raise ValueError(f"baseline row {dict(zip(columns, k))} has a missing, non-finite or non-positive "
                         f"speedup ({base[k].get('speedup')!r}); {len(bad)} such row(s): not a usable baseline")
    if not base:
        raise ValueError("the baseline has no slim row with status ok and a speedup to compare against")
    rule = judge if mode == "regression" else judge_interval
    verdicts = [rule(k, r, cur.get(k), tolerance) for k, r in sorted(base.items(), key=lambda kv: str(kv[0]))]
    return Comparison(verdicts=verdicts, tolerance=tolerance, mode=mode, key_columns=columns)


def format_comparison(c: Comparison) -> str:
    """A readable table of verdicts, then one line per failing row (and, for intervals, a tally)."""
    interval = c.mode == "interval"
    head = "/".join(c.key_columns)
    width = max([len(head)] + [len("/".join(str(x) for x in v.key)) for v in c.verdicts])
    limit = f"{'baseline 95% band':>20}" if interval else f"{'threshold':>9}"
    lines = [f"{head:<{width}} {'baseline':>8} {limit} {'current [95% CI]':>24}  verdict"]
    for v in c.verdicts:
        name = "/".join(str(x) for x in v.key)
        cur = "-" if v.status == "missing" else f"{v.current:.3f} [{v.current_low:.3f}, {v.current_high:.3f}]"
        band = f"{f'[{v.threshold:.3f}, {v.band_high:.3f}]':>20}" if interval else f"{v.threshold:>9.3f}"
        lines.append(f"{name:<{width}} {v.baseline:>8.3f} {band} {cur:>24}  {v.status.upper()}")
    for v in c.verdicts:
        if not v.same_plan:
            lines.append(f"NOTE: {dict(zip(c.key_columns, v.key))}: the slim model's plan differs from "
                         "the baseline's (plan_sha256): this compares two different models")
    for v in c.failures:
        what = dict(zip(c.key_columns, v.key))
        if v.status == "missing":
            lines.append(f"MISSING: {what}: no ok speedup row in the current run")
        elif v.status == "outside":
            side = "above" if v.current > v.band_high else "below"
            lines.append(f"OUTSIDE: {what}: speedup {v.current:.3f} is {side} the baseline's band "
                         f"[{v.threshold:.3f}, {v.band_high:.3f}] ({v.deviation:+.1%} from {v.baseline:.3f})")
        else:
            lines.append(f"REGRESSED: {what}: CI upper bound {v.current_high:.3f} < "
                         f"{1 - c.tolerance:.2f} x baseline {v.baseline:.3f} = {v.threshold:.3f}")
    if interval:
        lines.append(interval_tally(c))
    return "\n".join(lines)


def interval_tally(c: Comparison) -> str:
    """'N of M rows inside ...; deviation from the baseline speedup: median x%, max y%'."""
    measured = [v for v in c.verdicts if v.status != "missing"]
    inside = sum(v.status == "ok" for v in measured)
    devs = sorted(abs(v.deviation) for v in measured)
    spread = (f"; |deviation| from the baseline speedup: median {statistics.median(devs):.1%}, max {devs[-1]:.1%}"
              if devs else "")
    missing = len(c.verdicts) - len(measured)
    return (f"{inside} of {len(c.verdicts)} rows inside the baseline's interval"
            + (f" (widened by {c.tolerance:.0%})" if c.tolerance else "")
            + (f", {missing} missing" if missing else "") + spread)
