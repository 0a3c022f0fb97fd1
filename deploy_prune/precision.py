"""One precision vocabulary, shared by export (``--precision``), bench (``--precision``, each
backend's ``precisions``) and the latency allocation (``allocation.precision``).

Which of these a given exporter or backend supports is its own list, a subset of this one; a
name outside this tuple is an error wherever it is given.
"""

from __future__ import annotations

# fp32: IEEE single; tf32: fp32 tensors, TensorFloat-32 math in convolutions and matmuls
# (TensorRT); fp16, bf16: half-width tensors; int8: quantised engine, fp32 inputs (TensorRT).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "int8")


def check_precision(name: str, *, key: str = "precision") -> str:
    """``name`` when it is in the vocabulary, else a ValueError naming ``key``."""
    if name not in PRECISIONS:
        raise ValueError(f"{key} {name!r}: expected one of {', '.join(PRECISIONS)}")
    return name
