"""Bench backends: one module each behind :class:`Backend`, registered by name in
:data:`BACKENDS`. Heavy packages (onnxruntime, tensorrt) are imported only inside the backend
that needs them, so ``import bench.backends`` works anywhere.

To add a backend: write ``bench/backends/NAME.py`` with a :class:`Backend` subclass decorated
by ``@register("NAME")`` and import it below. ``onnx_cache`` is not a backend: it exports an
artifact's ONNX file once for the backends (and the suite) that take ONNX.
"""

from bench.backends import aoti, ort, ort_trt, torch_compile, torch_eager, trt  # noqa: F401
from bench.backends._base import (
    BACKENDS,
    DEVICES,
    DTYPES,
    Artifact,
    Backend,
    BackendOptions,
    register,
)
from deploy_prune.precision import PRECISIONS  # the one vocabulary, shared with export

__all__ = ["BACKENDS", "DEVICES", "DTYPES", "PRECISIONS", "Artifact", "Backend", "BackendOptions", "register"]
