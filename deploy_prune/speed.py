"""The slowdown guard: after ``prune`` and at the end of ``run``, time the slim model against its
base and say so loudly when it is not faster.

The measurement is bench's paired timing (``bench.guard.measure``, reached through the
``deploy_prune.checks`` entry point, so the core never imports bench): ONNX Runtime CPU, batch 1,
one thread, CPU clock by default (``allocation.backend/device/precision/batch``), a few seconds.
A slim model that is not clearly faster (the 95% interval's lower end at or below 1) gets a
warning naming the likely cause; ``speed_check.require_speedup`` (``--require-speedup X``)
turns a speedup below X into an error; ``speed_check.enabled=false`` (``--no-speed-check``)
switches the guard off.

``speed_check(...)`` returns a JSON-ready dict (saved as ``speed_check`` in plan.json and
report.json) and ``summary_line(result)`` the one line a summary prints.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from deploy_prune.artifacts import ModelPlan
from deploy_prune.config import RunConfig
from deploy_prune.flops import count

log = logging.getLogger(__name__)
CHECK_GROUP = "deploy_prune.checks"


class SlowerThanRequired(ValueError):
    """The measured speedup is below ``speed_check.require_speedup``."""


def _measurer():
    found = {ep.name: ep for ep in entry_points(group=CHECK_GROUP)}
    return found["speed"].load() if "speed" in found else None


def likely_cause(base: nn.Module, slim: nn.Module, flops_reduction: float, base_ms: float | None,
                 device: str = "cpu") -> str:
    """The probable reasons a cut model is not faster, from what changed between the two."""
    from deploy_prune.decisions import auto_round_to

    old = {n: m for n, m in base.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [(n, m) for n, m in slim.named_modules()
               if isinstance(m, nn.Conv2d) and n in old and m.out_channels != old[n].out_channels]
    causes = []
    block = auto_round_to(device)[0]
    odd = [n for n, m in changed if m.out_channels % block]
    if odd:
        causes.append(f"{len(odd)} cut convs have widths that are not multiples of {block}, the channel block "
                      f"of this hardware (e.g. {odd[0]}); use --round-to auto (the default)")
    dw = [n for n, m in changed if m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    if dw:
        causes.append(f"{len(dw)} narrowed depthwise convs (e.g. {dw[0]}) save FLOPs but little time "
                      "on CPU kernels")
    # whole groups cut keep each group's width; narrower groups are what grouped kernels pay for
    thin = [(n, old[n].in_channels // old[n].groups, m.in_channels // m.groups) for n, m in changed
            if 1 < m.groups < m.in_channels and m.in_channels // m.groups != old[n].in_channels // old[n].groups]
    if thin:
        n, was, now = thin[0]
        causes.append(f"{len(thin)} grouped convs have narrower groups (e.g. {n}: {was} -> {now} channels "
                      "per group), which grouped kernels run at a lower rate")
    if flops_reduction < 1.15:
        causes.append(f"only {flops_reduction:.2f}x fewer FLOPs were removed")
    if base_ms is not None and base_ms < 0.3:
        causes.append(f"the base takes {base_ms:.3f} ms: per-call overhead, not compute, dominates")
    causes.append("--target-speedup X chooses widths by measured time instead of FLOPs")
    return "; ".join(causes)


def summary_line(result: dict[str, Any] | None) -> str:
    """One line: measured speedup beside the FLOPs reduction (or why it was not measured)."""
    if not result:
        return "speed check: off"
    if "skipped" in result:
        return f"speed check: not measured ({result['skipped']})"
    return (f"measured speedup {result['speedup']:.2f}x [{result['low']:.2f}, {result['high']:.2f}] "
            f"({result['backend']} {result['device']} batch {result['batch']}, {result['threads']} "
            f"thread(s), {result['clock']} clock) for {result['flops_reduction']:.2f}x fewer FLOPs: "
            f"efficiency {result['efficiency']:.2f}")


def speed_check(base: nn.Module, base_plan: ModelPlan, slim: nn.Module, slim_plan: ModelPlan,
                cfg: RunConfig) -> dict[str, Any] | None:
    """Measure ``slim`` against ``base`` (None when the guard is off); warns when not faster."""
    if not cfg.speed_check.enabled:
        return None
    a = cfg.allocation
    example = base_plan.example()
    flops_reduction = count(base, example).flops / max(count(slim, slim_plan.example()).flops, 1)
    measure = _measurer()
    if measure is None:
        result: dict[str, Any] = {"skipped": f"no {CHECK_GROUP!r} entry point named 'speed' is installed "
                                  "(pip install -e . in the deploy-prune checkout)"}
    else:
        try:
            result = measure(base, base_plan, slim, slim_plan, backend=a.backend, device=a.device,
                             precision=a.precision, batch=a.batch)
        except Exception as e:  # a guard must not lose the pruned model: report and go on
            result = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    result["flops_reduction"] = flops_reduction
    if "skipped" in result:
        log.warning("speed check: not measured (%s)", result["skipped"])
        return result
    result["efficiency"] = result["speedup"] / flops_reduction
    result["faster"] = bool(result["low"] > 1.0)
    if not result["faster"]:
        verdict = "SLOWER than" if result["speedup"] < 1.0 else "not measurably faster than"
        result["cause"] = likely_cause(base, slim, flops_reduction, result.get("base_ms"), a.device)
        msg = (f"the pruned model is {verdict} its base: {summary_line(result)}. "
               f"Likely cause: {result['cause']}")
        log.warning(msg)
        print(f"WARNING: {msg}", file=sys.stderr)
    return result


def enforce(result: dict[str, Any] | None, cfg: RunConfig, *, where: str) -> None:
    """Raise :class:`SlowerThanRequired` when ``speed_check.require_speedup`` is not met."""
    need = cfg.speed_check.require_speedup
    if need is None:
        return
    if not result or "skipped" in result:
        why = result["skipped"] if result else "speed_check.enabled=false"
        raise SlowerThanRequired(f"--require-speedup {need:g}: the speedup was not measured ({why}); "
                                 f"{where} was written")
    if result["speedup"] < need:
        raise SlowerThanRequired(
            f"--require-speedup {need:g}: {summary_line(result)}, below the requirement"
            + (f" (likely cause: {result['cause']})" if result.get("cause") else "")
            + f"; {where} was written")
