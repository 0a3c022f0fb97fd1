"""The environment a measurement was taken in: CPU, threads, load, libraries, GPU and its clocks.

GPU facts come from NVML (``nvidia-ml-py``, imported here only) when a GPU is present: name,
driver, CUDA driver version, SM/memory clocks against their maxima, temperature, power and the
current clock-event ("throttle") reasons, so a slow row can be traced to a throttled GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from deploy_prune.artifacts import versions as core_versions

log = logging.getLogger(__name__)
PACKAGES = ("numpy", "pandas", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "nvidia-ml-py")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    """deploy_prune's provenance versions plus the bench stack (installed distributions only)."""
    out = dict(core_versions())
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["cuda_runtime"] = str(torch.version.cuda)
    return out


def _nvml_reasons(pynvml: Any, handle: Any) -> str:
    """Names of the active clock-event reasons (older NVML calls them throttle reasons)."""
    get = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = int(get(handle))
    names = [n for n in dir(pynvml) if n.startswith(("nvmlClocksEventReason", "nvmlClocksThrottleReason"))]
    active = {n.split("Reason", 1)[1] for n in names
              if isinstance(getattr(pynvml, n), int) and getattr(pynvml, n) & mask
              and not n.endswith(("All", "None"))}
    return ",".join(sorted(active)) or "none"


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    """``pynvml``, initialised, or None without the package, a driver or a GPU; shut down after."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no package, no driver, no GPU
        log.debug("NVML unavailable: %s", e)
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def gpu_state(index: int = 0) -> dict[str, Any]:
    """Clocks, temperature, power and throttle reasons of GPU ``index`` now ({} without NVML)."""
    with _nvml() as nv:
        if nv is None:
            return {}
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            clk = nv.NVML_CLOCK_SM
            return {"gpu_sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, clk),
                    "gpu_sm_clock_max_mhz": nv.nvmlDeviceGetMaxClockInfo(h, clk),
                    "gpu_mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                    "gpu_temp_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                    "gpu_power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                    "gpu_throttle_reasons": _nvml_reasons(nv, h)}
        except Exception as e:  # an NVML call this driver lacks must not stop a benchmark
            log.warning("NVML query failed: %s", e)
            return {}


def gpu_identity(index: int = 0) -> dict[str, Any]:
    """GPU name, driver and CUDA driver version (NVML), or torch's view without NVML."""
    out: dict[str, Any] = {}
    if torch.cuda.is_available():
        out["gpu_name"] = torch.cuda.get_device_name(index)
    with _nvml() as nv:
        if nv is None:
            return out
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            cuda = nv.nvmlSystemGetCudaDriverVersion()
            out.update(gpu_name=_text(nv.nvmlDeviceGetName(h)),
                       gpu_driver=_text(nv.nvmlSystemGetDriverVersion()),
                       cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}")
        except Exception as e:
            log.warning("NVML query failed: %s", e)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def now() -> str:
    """Local time, ISO 8601 with offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def collect(*, threads: int) -> dict[str, Any]:
    """Everything about this machine and process that a result row should carry."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    env: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(load[0], 2),
        "timestamp": now(),
        "versions": library_versions(),
    }
    env.update(gpu_identity())
    env.update(gpu_state())
    return env
