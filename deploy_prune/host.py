"""Facts about the machine this process runs on."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CPUINFO = Path("/proc/cpuinfo")


def simd() -> str:
    """The widest x86 vector extension this CPU has: ``avx512``, ``avx2``, or ``other`` (ARM,
    older x86, or a platform without /proc/cpuinfo). It fixes how CPU conv kernels block channels:
    ONNX Runtime's MLAS NCHWc kernels and oneDNN's blocked layouts use blocks of 16 channels with
    AVX-512 and of 8 with AVX2."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return "other"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"
