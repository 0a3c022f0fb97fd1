"""PyTorch model -> ONNX file: BatchNorm folded, dynamic batch, checked, verified in ONNX Runtime.

The graph has one input ``input`` (B, C, H, W) float32 and one output ``logits`` (B, classes);
with ``dynamic_batch`` the batch axis is the symbol ``batch``. Provenance is stored in the
model's ``metadata_props``, every value JSON-encoded (:func:`read_metadata` decodes them).

``precision="fp16"`` writes the layout ModelOpt AutoCast's ``keep_io_types`` produces: fp32
input and output, fp16 weights and compute in between (one Cast after the input, one before
the output). TensorRT 11 builds every network strongly typed, so such a half-typed graph is
the only way to get an fp16 engine from it (see :mod:`export.to_trt`).

A graph that would serialise past protobuf's 2 GiB (:data:`EXTERNAL_DATA_LIMIT`) is written with
its weights as ONNX external data: ``NAME.onnx`` plus one ``NAME.onnx.data`` beside it (see
:mod:`export.onnx_files`); both appear together once verified, or neither.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import EncodeError
from torch import nn

from export._staging import ensure_writable, staged_onnx
from export.errors import BackendUnavailableError, ParityError, first_line
from export.fold import fold_batchnorm
from export.formats import COMMON_OPTIONS, FORMATS, FormatSpec, export_versions, from_model_dir
from export.onnx_files import check_data_file, check_external_data, data_path, onnx_size
from export.parity import check_example, check_parity, tolerance

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ONNX_PRECISIONS", "ParityError", "export_onnx", "read_metadata",
           "verify_onnx"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
DEFAULT_OPSET = 18
_PROTOBUF_LIMIT = 2**31 - 1  # a single-file ONNX model must serialise below 2 GiB
# Past this many serialised bytes the weights go to NAME.onnx.data (tests lower it to force
# external data on a small model); tensors of at least EXTERNAL_MIN_BYTES move, smaller stay inline.
EXTERNAL_DATA_LIMIT = _PROTOBUF_LIMIT
EXTERNAL_MIN_BYTES = 1024
ONNX_PRECISIONS = ("fp32", "fp16")
# fp32 parity tolerance (rtol, atol); fp16 uses export.parity.DEFAULT_TOLERANCE["fp16"], atol
# scaled by the logits' magnitude, the same rule the TensorRT fp16 engines are held to.
FP32_TOLERANCE = (1e-3, 1e-4)
_HALF_DTYPES = {"fp16": torch.float16}


class HalfCompute(nn.Module):
    """``model`` in half precision behind fp32 input and output (AutoCast ``keep_io_types``).

    The casts live in the graph, so callers feed and read fp32 exactly as with an fp32 export
    while the weights are stored, and the convolutions run, in half precision.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.m = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x.to(self.dtype)).float()


def export_onnx(model: nn.Module, example: torch.Tensor, out: str | Path, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, simplify: bool = False, verify: bool = True,
                metadata: Mapping[str, Any] | None = None, rtol: float | None = None,
                atol: float | None = None, force: bool = False, precision: str = "fp32") -> Path:
    """Export ``model`` to ONNX at ``out``; the file appears only once it passed every check.

    ``example`` is a (B, C, H, W) input fixing the shape (and the batch when
    ``dynamic_batch=False``). BatchNorm is folded before export (see :mod:`export.fold`); the
    file is checked by ``onnx.checker`` with strict shape inference; with ``verify`` it is run
    in ONNX Runtime at batch 1 and 7 (the fixed batch when static) and must match ``model``
    within ``atol + rtol * |ref|``, else :class:`ParityError` and no file is written.
    ``precision`` is ``fp32`` or ``fp16`` (fp32 IO, fp16 weights and compute: the graph a
    TensorRT 11 fp16 engine is built from). Tolerances default per precision: fp32
    ``rtol=1e-3, atol=1e-4``; fp16 that of TensorRT fp16 engines (atol scaled by the logits).
    A graph past :data:`EXTERNAL_DATA_LIMIT` keeps its weights in ``out.name + ".data"`` beside
    ``out``; both files appear together, or neither.
    """
    out = Path(out)
    check_precision(precision)
    ensure_writable(out, force=force)
    ensure_writable(data_path(out), force=force)
    check_example(example)
    t0 = time.perf_counter()
    proto = to_proto(model, example, opset=opset, dynamic_batch=dynamic_batch, precision=precision)
    if simplify:
        proto = simplify_proto(proto)
    _check_no_batchnorm(proto)
    set_metadata(proto, {**_default_metadata(example, opset, dynamic_batch, precision), **(metadata or {})})
    with staged_onnx(out, force=force) as tmp:
        _save(proto, tmp, location=data_path(out).name)
        check_onnx(tmp)
        if verify:
            r, a = parity_tolerance(precision, model, tuple(example.shape[1:]), rtol, atol)
            _verify(tmp, model, batches=(1, 7), rtol=r, atol=a, providers=None, label=out.name)
        else:
            log.warning("ONNX parity check skipped (verify=False): %s is unverified", out)
    log.info("wrote %s (%.1f MB%s, opset %d, %s batch, %s) in %.1f s", out, onnx_size(out) / 1e6,
             f" with {data_path(out).name}" if data_path(out).is_file() else "", opset,
             "dynamic" if dynamic_batch else "static", precision, time.perf_counter() - t0)
    return out


def check_precision(precision: str) -> None:
    """Only fp32 and fp16 graphs are exported; say where the other precisions come from."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(
            f"ONNX export precision {precision!r} is not one of {', '.join(ONNX_PRECISIONS)} "
            f"(--precision for --format onnx). bf16 Conv needs opset 22: convert an fp32 export with "
            f"'python -m modelopt.onnx.autocast --low_precision_type bf16 --keep_io_types'; int8 needs "
            f"Q/DQ nodes: 'python -m modelopt.onnx.quantization --quantize_mode int8'")


def parity_tolerance(precision: str, model: nn.Module, chw: tuple[int, ...], rtol: float | None,
                     atol: float | None) -> tuple[float, float]:
    """(rtol, atol) for an ONNX export at ``precision``; explicit values win.

    fp16 reuses the TensorRT fp16 tolerance, atol scaled by the logits' magnitude: rounding
    to half precision grows with the sums, not with each output, as for an fp16 engine.
    """
    if precision == "fp32":
        return (FP32_TOLERANCE[0] if rtol is None else rtol), (FP32_TOLERANCE[1] if atol is None else atol)
    with eval_reference(model) as reference:
        return tolerance(precision, reference, chw, rtol, atol)


def to_proto(model: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
             dynamic_batch: bool = True, precision: str = "fp32") -> onnx.ModelProto:
    """The BN-folded ONNX graph of ``model`` (in memory, unchecked), fp32 or fp16 inside."""
    if importlib.util.find_spec("onnxscript") is None:
        raise BackendUnavailableError("ONNX export needs onnxscript (torch's ONNX exporter is built "
                                      "on it): pip install onnxscript")
    folded = fold_batchnorm(model)
    if precision in _HALF_DTYPES:  # fold in fp32 first, then round the folded weights once
        folded = HalfCompute(folded, _HALF_DTYPES[precision]).eval()
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
                rtol: float | None = None, atol: float | None = None,
                providers: Sequence[str] | None = None) -> dict[int, float]:
    """Run ``onnx_path`` in ONNX Runtime against ``model``; batch size -> max absolute difference.

    Raises ParityError beyond ``atol + rtol * |ref|``; the defaults are those of the precision
    the file records in its metadata (fp32 ``1e-3``/``1e-4`` when it records none). A static
    batch axis is probed at its own size only. ``providers`` defaults to the CPU execution provider.
    """
    path = Path(onnx_path)
    if rtol is None or atol is None:
        meta = _metadata_or_empty(path)
        precision = meta.get("precision") if meta.get("precision") in ONNX_PRECISIONS else "fp32"
        chw = tuple(meta.get("input_shape") or ())
        rtol, atol = parity_tolerance(precision, model, chw, rtol, atol)
    return _verify(path, model, batches=batches, rtol=rtol, atol=atol, providers=providers, label=path.name)


def _metadata_or_empty(path: Path) -> dict[str, Any]:
    """The file's metadata, or {} when it is no ONNX model (open_session then says so in one line)."""
    try:
        return read_metadata(path)
    except ValueError:
        return {}


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

    with eval_reference(model) as reference:
        return check_parity(run, reference, shape, batches, rtol=rtol, atol=atol,
                            what=f"ONNX Runtime ({session.get_providers()[0]}) on {label}")


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
        check_data_file(path)  # a missing or short NAME.onnx.data: name that file
        raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {first_line(e)})") from None


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with strict shape inference, on the file (no 2 GiB re-serialisation; it
    finds external data beside the file), then the external-data file's length, which the
    checker does not look at."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        check_data_file(path)
        raise ValueError(f"{path}: the exported graph fails onnx.checker: {first_line(e)}") from None
    check_external_data(path)  # the checker finds a data file but does not check its length


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


def _default_metadata(example: torch.Tensor, opset: int, dynamic_batch: bool,
                      precision: str) -> dict[str, Any]:
    """``precision`` is the compute type inside; ``io_dtype`` that of the input and output."""
    return {"producer": "deploy-prune export", "opset": opset, "dynamic_batch": dynamic_batch,
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "input_shape": list(example.shape[1:]), "versions": export_versions(),
            "precision": precision, "io_dtype": "float32"}


def _check_opset(proto: onnx.ModelProto, opset: int) -> None:
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(f"opset {opset} was requested but the exporter produced opset {got} "
                         f"(its version conversion failed); use opset >= 18")


def _check_no_batchnorm(proto: onnx.ModelProto) -> None:
    left = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if left:
        log.warning("%d BatchNormalization node(s) left in the graph (no conv/linear before them)", left)


def serialised_size(proto: onnx.ModelProto) -> int:
    """Bytes ``proto`` serialises to; past 2 GiB protobuf cannot even count them (``ByteSize``
    raises EncodeError), which is then reported as just over the limit."""
    try:
        return proto.ByteSize()
    except EncodeError:
        return _PROTOBUF_LIMIT + 1


def _save(proto: onnx.ModelProto, path: Path, *, location: str) -> None:
    """One file, or past :data:`EXTERNAL_DATA_LIMIT` the graph at ``path`` and every tensor of at
    least :data:`EXTERNAL_MIN_BYTES` in ``location`` (a file name beside it, relative as the
    ONNX external-data spec wants). torch's own ``ONNXProgram.save`` switches at 1.5 GiB of
    initializers and writes the same ``NAME.onnx.data``; ``model_proto``, used here, never
    switches, so the choice is made here. ``proto``'s tensors are moved out of it when saved so."""
    size = serialised_size(proto)
    if size <= EXTERNAL_DATA_LIMIT:
        onnx.save_model(proto, str(path))
        return
    log.info("the ONNX graph is %s, over the %d-byte single-file limit: writing its weights to %s beside it",
             "over 2 GiB" if size > _PROTOBUF_LIMIT else f"{size} bytes", EXTERNAL_DATA_LIMIT, location)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=EXTERNAL_MIN_BYTES, convert_attribute=False)
    if path.stat().st_size > _PROTOBUF_LIMIT:
        raise ValueError(f"the ONNX graph is over 2 GiB even with its weights in {location} "
                         f"(large constants inside nodes?); it cannot be saved")


@contextmanager
def eval_reference(model: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``model`` in eval mode as a function of CPU inputs (moved to its device); mode restored after."""
    device, was_training = _device_of(model), model.training
    model.eval()
    try:
        yield lambda x: model(x.to(device))
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


FORMATS.register("onnx")(FormatSpec(
    export=from_model_dir(export_onnx), suffix=".onnx",
    options=COMMON_OPTIONS | {"opset", "dynamic_batch", "batch", "simplify", "precision"},
    help="ONNX graph (BatchNorm folded, dynamic batch, fp32 or fp16 inside), verified in ONNX Runtime"))
