"""deploy-prune export: slim (or base) model directories -> ONNX, TensorRT engines, AOTInductor.

``export_model_dir(dir, "onnx" | "tensorrt" | "aoti", out, **options)`` is the one entry point;
the per-format functions live in ``to_onnx``, ``to_trt`` and ``to_aoti``. Every artifact is
written under a temporary name and renamed into place only after it matched the PyTorch model.
TensorRT is imported lazily, so this package imports without it.
"""

from export import to_aoti, to_onnx, to_trt  # noqa: F401  (importing registers the formats)
from export.errors import BackendUnavailableError, ParityError
from export.formats import FORMATS, FormatSpec, export_model_dir

__all__ = ["FORMATS", "BackendUnavailableError", "FormatSpec", "ParityError", "export_model_dir"]
