"""PyTorch model -> ONNX file: BatchNorm folded, dynamic batch, checked, verified in ONNX Runtime.

The graph has one input ``input`` (B, C, H, W) float32 and one output ``logits`` (B, classes);
with ``dynamic_batch`` the batch axis is the symbol ``batch``. Provenance is stored in the
model's ``metadata_props``, every value JSON-encoded (:func:`read_metadata` decodes them).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export._staging import ensure_writable, staged
from export.errors import BackendUnavailableError, ParityError, first_line
from export.fold import fold_batchnorm
from export.formats import COMMON_OPTIONS, FORMATS, FormatSpec, export_versions, from_model_dir
from export.parity import check_example, check_parity

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ParityError", "export_onnx", "read_metadata", "verify_onnx"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 18
_PROTOBUF_LIMIT = 2**31 - 1  # a single-file ONNX model must serialise below 2 GiB


def export_onnx(model: nn.Module, example: torch.Tensor, out: str | Path, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, simplify: bool = False, verify: bool = True,
                metadata: Mapping[str, Any] | None = None, rtol: float = 1e-3, atol: float = 1e-4,
                force: bool = False) -> Path:
    """Export ``model`` to ONNX at ``out``; the file appears only once it passed every check.

    ``example`` is a (B, C, H, W) input fixing the shape (and the batch when
    ``dynamic_batch=False``). BatchNorm is folded before export (see :mod:`export.fold`); the
    file is checked by ``onnx.checker`` with strict shape inference; with ``verify`` it is run
    in ONNX Runtime at batch 1 and 7 (the fixed batch when static) and must match ``model``
    within ``atol + rtol * |ref|``, else :class:`ParityError` and no file is written.
    """
    out = Path(out)
    ensure_writable(out, force=force)
    check_example(example)
    t0 = time.perf_counter()
    proto = to_proto(model, example, opset=opset, dynamic_batch=dynamic_batch)
    if simplify:
        proto = simplify_proto(proto)
    _check_no_batchnorm(proto)
    set_metadata(proto, {**_default_metadata(example, opset, dynamic_batch), **(metadata or {})})
    with staged(out, force=force, suffix=".onnx") as tmp:
        _save(proto, tmp)
        check_onnx(tmp)
        if verify:
            _verify(tmp, model, batches=(1, 7), rtol=rtol, atol=atol, providers=None, label=out.name)
        else:
            log.warning("ONNX parity check skipped (verify=False): %s is unverified", out)
    log.info("wrote %s (%.1f MB, opset %d, %s batch) in %.1f s", out, out.stat().st_size / 1e6, opset,
             "dynamic" if dynamic_batch else "static", time.perf_counter() - t0)
    return out


def to_proto(model: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
             dynamic_batch: bool = True) -> onnx.ModelProto:
    """The BN-folded ONNX graph of ``model`` (in memory, unchecked)."""
    if importlib.util.find_spec("onnxscript") is None:
        raise BackendUnavailableError("ONNX export needs onnxscript (torch's ONNX exporter is built "
                                      "on it): pip install onnxscript")
    folded = fold_batchnorm(model)
    x = example
    if dynamic_batch and example.shape[0] < 2:
        x = example[:1].repeat(2, 1, 1, 1)  # torch.export specialises a size-1 dim to a constant
    shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    # The torch.export-based exporter (dynamo=True) is the default since torch 2.9 and is the
    # one maintained on both torch 2.11 and 2.15; the TorchScript one (dynamo=False) still runs
    # on 2.15 but warns it will be removed. Its dynamic axes are torch.export Dims passed as
    # ``dynamic_shapes`` (``dynamic_axes`` belongs to the TorchScript exporter). ``optimize``
    # folds constants and removes identities; ``verbose=False`` silences its progress prints.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                folded, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=shapes, optimize=True, verbose=False)
    except Exception as e:  # torch.export / onnxscript raise many types; report one line
        raise ValueError(f"torch.onnx.export failed on {type(model).__name__}: "
                         f"{type(e).__name__}: {first_line(e)}") from e
    proto = program.model_proto
    _check_opset(proto, opset)
    return proto


def simplify_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Simplify the graph with onnxslim (constant folding, redundant-node removal)."""
    try:
        import onnxslim
    except ImportError:
        raise BackendUnavailableError("ONNX simplification needs onnxslim: "
                                      "pip install 'deploy-prune[slim]'") from None
    try:
        slim = onnxslim.slim(proto)
    except Exception as e:
        raise ValueError(f"onnxslim failed: {type(e).__name__}: {first_line(e)}") from e
    log.info("onnxslim: %d -> %d nodes", len(proto.graph.node), len(slim.graph.node))
    return slim


def verify_onnx(onnx_path: str | Path, model: nn.Module, *, batches: Sequence[int] = (1, 7),
                rtol: float = 1e-3, atol: float = 1e-4,
                providers: Sequence[str] | None = None) -> dict[int, float]:
    """Run ``onnx_path`` in ONNX Runtime against ``model``; batch size -> max absolute difference.

    Raises ParityError beyond ``atol + rtol * |ref|``. A static batch axis is probed at its own
    size only. ``providers`` defaults to the CPU execution provider.
    """
    path = Path(onnx_path)
    return _verify(path, model, batches=batches, rtol=rtol, atol=atol, providers=providers, label=path.name)


def _verify(path: Path, model: nn.Module, *, batches: Sequence[int], rtol: float, atol: float,
            providers: Sequence[str] | None, label: str) -> dict[int, float]:
    session = open_session(path, providers=providers)
    if len(session.get_inputs()) != 1:
        raise ValueError(f"{path}: expected one input (B, C, H, W), found {len(session.get_inputs())}")
    inp = session.get_inputs()[0]
    shape = inp.shape[1:]
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"{path}: input {inp.name} has non-static dims {inp.shape}; expected (B, C, H, W)")
    if isinstance(inp.shape[0], int):
        batches = (inp.shape[0],)

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])
        except Exception as e:  # onnxruntime's own exception types
            raise ValueError(f"{label}: ONNX Runtime failed at batch {x.shape[0]}: {first_line(e)}") from None

    device, was_training = _device_of(model), model.training
    model.eval()
    try:
        return check_parity(run, lambda x: model(x.to(device)), shape, batches, rtol=rtol, atol=atol,
                            what=f"ONNX Runtime ({session.get_providers()[0]}) on {label}")
    finally:
        model.train(was_training)


def open_session(path: Path, *, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session for ``path``, or a one-line ValueError if it cannot load it."""
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # InvalidProtobuf, Fail, ... from the C++ side
        raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {first_line(e)})") from None


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with strict shape inference, on the file (no 2 GiB re-serialisation)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{path}: the exported graph fails onnx.checker: {first_line(e)}") from None


def set_metadata(proto: onnx.ModelProto, values: Mapping[str, Any]) -> None:
    """Store ``values`` in ``metadata_props`` (JSON-encoded), replacing same-named keys."""
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({str(k): json.dumps(v, sort_keys=True) for k, v in values.items()})
    onnx.helper.set_model_props(proto, props)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, JSON-decoded (raw strings for foreign keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ValueError(f"{path}: not an ONNX model ({first_line(e)})") from None
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def _default_metadata(example: torch.Tensor, opset: int, dynamic_batch: bool) -> dict[str, Any]:
    return {"producer": "deploy-prune export", "opset": opset, "dynamic_batch": dynamic_batch,
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "input_shape": list(example.shape[1:]), "versions": export_versions()}


def _check_opset(proto: onnx.ModelProto, opset: int) -> None:
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(f"opset {opset} was requested but the exporter produced opset {got} "
                         f"(its version conversion failed); use opset >= 18")


def _check_no_batchnorm(proto: onnx.ModelProto) -> None:
    left = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if left:
        log.warning("%d BatchNormalization node(s) left in the graph (no conv/linear before them)", left)


def _save(proto: onnx.ModelProto, path: Path) -> None:
    size = proto.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise ValueError(f"the ONNX graph is {size / 2**30:.2f} GiB; single-file ONNX is limited "
                         f"to 2 GiB and external-data export is not supported here")
    onnx.save_model(proto, str(path))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


FORMATS.register("onnx")(FormatSpec(
    export=from_model_dir(export_onnx), suffix=".onnx",
    options=COMMON_OPTIONS | {"opset", "dynamic_batch", "batch", "simplify"},
    help="ONNX graph (BatchNorm folded, dynamic batch), verified in ONNX Runtime"))
