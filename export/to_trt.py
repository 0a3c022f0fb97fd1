"""ONNX file -> TensorRT engine (TensorRT 10 and 11), verified on the GPU, with a build report.

TensorRT 10 builds "weakly typed": the ONNX graph is fp32 and builder flags (FP16, BF16, INT8
with an entropy calibrator) let TensorRT pick lower-precision kernels. TensorRT 11 removed those
flags and the calibrator: every network is strongly typed, so the precision is the ONNX graph's
own (an fp16-typed graph for fp16, explicit QuantizeLinear/DequantizeLinear nodes for int8).
:func:`plan_build` decides from the TensorRT major version, the requested precision and what the
ONNX graph holds; it is pure, so the rules are tested without TensorRT.

``tensorrt`` is imported only inside these functions, so ``import export`` works without it;
asking for TensorRT without the package or without a CUDA GPU raises
:class:`~export.errors.BackendUnavailableError` naming which is missing (the package first).

Next to ``ENGINE`` the build writes ``ENGINE.json`` (TensorRT version, GPU and compute
capability, precision, batch profile, build seconds, parity, reformat-layer count, provenance)
and ``ENGINE.layers.json`` (the engine inspector's per-layer report). Reformat/copy layers are
what TensorRT inserts to convert tensor layouts, e.g. when a pruned channel count is not a
multiple of the vector width its fast kernels want, so their count shows what odd widths cost.
INT8 builds write the calibration cache to ``ENGINE.calib`` and reuse it when present.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.artifacts import ModelPlan
from deploy_prune.artifacts import atomic_write_text as write_text_atomic
from deploy_prune.precision import PRECISIONS
from export._staging import ensure_writable, staged, write_bytes_atomic
from export.errors import BackendUnavailableError, first_line
from export.formats import COMMON_OPTIONS, FORMATS, FormatSpec, provenance
from export.parity import batches_in_range, check_parity, tolerance

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "deploy-prune/trt-engine@1"
DEFAULT_PRECISION = "fp16"
STRONG_TYPING_MAJOR = 11  # the first TensorRT without weak typing (BuilderFlag.FP16/INT8, calibrators)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
MODELOPT_AUTOCAST = ("python -m modelopt.onnx.autocast --onnx_path model.onnx --output_path "
                     "model_{t}.onnx --low_precision_type {t} --keep_io_types")
MODELOPT_INT8 = ("python -m modelopt.onnx.quantization --onnx_path model.onnx --quantize_mode int8 "
                 "--calibration_data_path calib.npy --output_path model_int8.onnx")
MODELOPT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com 'nvidia-modelopt[all]'"


@dataclass(frozen=True)
class OnnxInput:
    """The ONNX file to build from: its bytes, input tensor name, (C, H, W) and what it is typed as.

    ``float_type`` is the lowest float precision of its initializers (fp32, fp16, bf16) and
    ``has_qdq`` whether it is explicitly quantized: what a strongly typed build runs at.
    """

    path: Path
    data: bytes
    input_name: str
    chw: tuple[int, ...]
    float_type: str
    has_qdq: bool


@dataclass(frozen=True)
class BuildPlan:
    """How to configure the builder: typing, flags to set and clear, whether to calibrate."""

    typing: str  # "weak" (TensorRT 10) or "strong" (TensorRT 11+)
    set_flags: tuple[str, ...]  # BuilderFlag names to set
    clear_flags: tuple[str, ...]  # BuilderFlag names to clear
    calibrate: bool  # int8 entropy calibration (weak typing only)

    @property
    def strongly_typed(self) -> bool:
        return self.typing == "strong"


@dataclass(frozen=True)
class BuildSettings:
    """What the engine is built for: precision, batch profile, workspace and timing cache."""

    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_gb: float
    timing_cache: Path | None


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, once both it and a CUDA GPU are known to be present."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT export needs the 'tensorrt' Python package (TensorRT 10 or newer), which "
            "is not installed: pip install tensorrt") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT export needs a CUDA GPU; tensorrt is installed "
                                      "but PyTorch sees no CUDA device")
    if tensorrt_major(trt) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; TensorRT 10 or newer is needed")
    return trt


def tensorrt_major(trt: Any) -> int:
    """The major version of the imported ``tensorrt`` module (``10`` for ``10.13.0.35``)."""
    return int(str(trt.__version__).split(".")[0])


_WEAK_FLAGS = {"fp32": (), "tf32": ("TF32",), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}


def plan_build(trt_major: int, precision: str, onnx_float: str = "fp32", has_qdq: bool = False) -> BuildPlan:
    """What to build for ``precision`` on TensorRT ``trt_major`` from an ONNX graph whose float
    initializers are ``onnx_float`` and that has (``has_qdq``) or lacks Q/DQ nodes.

    TensorRT 10 keeps the weak-typing path: precision flags, int8 calibrated with fp16
    fallback, fp32 with TF32 cleared. TensorRT 11+ builds strongly typed: the graph's types are
    the precision, so a graph that does not hold the requested precision is a ValueError
    saying how to get one. TF32 is not a tensor type and its flag survives in 11.x, so fp32
    still clears it and tf32 still sets it there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if trt_major < STRONG_TYPING_MAJOR:
        return BuildPlan("weak", _WEAK_FLAGS[precision], ("TF32",) if precision == "fp32" else (),
                         calibrate=precision == "int8")
    if precision == "int8":
        _require_qdq(trt_major, has_qdq)
        return BuildPlan("strong", (), (), calibrate=False)
    if has_qdq:
        raise ValueError(f"the ONNX graph has QuantizeLinear/DequantizeLinear nodes, so TensorRT "
                         f"{trt_major} (strongly typed) builds it as int8, not {precision}: build it with "
                         f"precision='int8', or build from the graph before quantization")
    wanted = "fp32" if precision in ("fp32", "tf32") else precision
    if onnx_float != wanted:
        raise ValueError(_type_mismatch(trt_major, precision, wanted, onnx_float))
    return BuildPlan("strong", ("TF32",) if precision == "tf32" else (), ("TF32",) if precision == "fp32" else (),
                     calibrate=False)


def _require_qdq(trt_major: int, has_qdq: bool) -> None:
    if not has_qdq:
        raise ValueError(
            f"int8 on TensorRT {trt_major} needs an explicitly quantized ONNX graph "
            f"(QuantizeLinear/DequantizeLinear nodes): implicit int8 calibration "
            f"(BuilderFlag.INT8, int8_calibrator) was removed in TensorRT 11. Quantize the fp32 "
            f"export with NVIDIA ModelOpt ONNX PTQ ({MODELOPT_INSTALL}): {MODELOPT_INT8}, then "
            f"build that file with build_engine(..., precision='int8')")


def _type_mismatch(trt_major: int, precision: str, wanted: str, onnx_float: str) -> str:
    """The error for a graph whose float type is not the requested precision's, with the fix."""
    head = (f"TensorRT {trt_major} builds strongly typed (the precision flags were removed in "
            f"TensorRT 11), so a {precision} engine needs a {wanted}-typed ONNX graph; this one is "
            f"{onnx_float}-typed")
    if wanted == "fp16":
        return (f"{head}. Export one with 'deploy-prune export DIR --format onnx --precision fp16', "
                f"or build from the model directory ('deploy-prune export DIR --format tensorrt "
                f"--precision fp16' exports it itself), or convert this file with ModelOpt AutoCast: "
                f"{MODELOPT_AUTOCAST.format(t='fp16')}")
    if wanted == "bf16":
        return (f"{head}. deploy-prune does not export bf16 graphs (ONNX Conv takes bf16 only from "
                f"opset 22); convert the fp32 export with ModelOpt AutoCast: "
                f"{MODELOPT_AUTOCAST.format(t='bf16')}")
    return (f"{head}. Build it with precision='{onnx_float}', or export an fp32 graph "
            f"('deploy-prune export DIR --format onnx')")


def onnx_typing(proto: Any) -> tuple[str, bool]:
    """(lowest float precision among the initializers and Constant nodes, has Q/DQ nodes).

    A mixed graph (AutoCast keeps sensitive layers fp32) counts as its lowest float type,
    since that is what a strongly typed build runs its bulk in. No float weights counts as fp32.
    """
    types = {t.data_type for t in proto.graph.initializer}
    for node in proto.graph.node:
        types.update(a.t.data_type for a in node.attribute if node.op_type == "Constant" and a.HasField("t"))
    floats = {_FLOAT_TYPES[t] for t in types if t in _FLOAT_TYPES}
    lowest = next((f for f in ("fp16", "bf16", "fp32") if f in floats), "fp32")
    return lowest, any(n.op_type in _QDQ_OPS for n in proto.graph.node)


def onnx_precision_for(trt_major: int, precision: str) -> str:
    """The ONNX precision to export for a ``precision`` engine: fp16 graphs for TensorRT 11 fp16."""
    return "fp16" if trt_major >= STRONG_TYPING_MAJOR and precision == "fp16" else "fp32"


def build_engine(onnx_path: str | Path, out: str | Path, *, precision: str = DEFAULT_PRECISION,
                 min_batch: int = 1, opt_batch: int = 8, max_batch: int = 128, workspace_gb: float = 4.0,
                 timing_cache: str | Path | None = None,
                 calibration_batches: Iterable[torch.Tensor] | None = None, force: bool = False,
                 model: nn.Module | None = None, verify: bool = True, rtol: float | None = None,
                 atol: float | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Build a TensorRT engine from ``onnx_path`` to ``out`` and verify it on the GPU.

    ``precision`` is one of fp32, tf32, fp16, bf16, int8. On TensorRT 10, int8 also enables
    fp16 for layers without an int8 kernel and needs ``calibration_batches``, equal-sized
    (B, C, H, W) tensors, unless ``ENGINE.calib`` exists. On TensorRT 11+ the ONNX graph must
    already be typed for ``precision`` (fp16/bf16 initializers, Q/DQ nodes for int8; see
    :func:`plan_build`), else ValueError naming how to get one; nothing is calibrated there.
    The profile covers batch ``min_batch..max_batch``, tuned for ``opt_batch``.
    ``timing_cache`` is read if it exists and written back after the build. With ``verify``
    the engine is run at two batch sizes against ``model`` (PyTorch on the GPU, TF32 off) or,
    without a model, against ONNX Runtime on the CPU; beyond tolerance (per-precision
    defaults, see export.parity.DEFAULT_TOLERANCE) it raises ParityError and keeps no file.
    """
    out = Path(out)
    settings = BuildSettings(precision, min_batch, opt_batch, max_batch, workspace_gb,
                             Path(timing_cache) if timing_cache is not None else None)
    _check_settings(settings)
    ensure_writable(out, force=force)
    onnx_in = _read_onnx(Path(onnx_path), settings)
    trt = require_tensorrt()
    plan = plan_build(tensorrt_major(trt), precision, onnx_in.float_type, onnx_in.has_qdq)
    calib = _calibration(trt, calibration_batches, calib_path(out), onnx_in.chw) if plan.calibrate else None
    t0 = time.perf_counter()
    blob = _build(trt, onnx_in, settings, plan, calib)
    seconds = time.perf_counter() - t0
    log.info("built a %s TensorRT engine from %s in %.1f s", precision, onnx_in.path.name, seconds)
    with staged(out, force=force, suffix=".engine") as tmp:
        tmp.write_bytes(blob)
        runner = TRTRunner(tmp)
        parity = _verify(runner, onnx_in, model, settings, rtol, atol) if verify else None
        if parity is None:
            log.warning("TensorRT parity check skipped (verify=False): %s is unverified", out)
        layers = runner.layer_report()
        write_text_atomic(layers_path(out), json.dumps(layers, indent=1) + "\n")
        side = _sidecar(trt, settings, seconds, parity, layers, onnx_in, plan, calib, metadata)
        write_text_atomic(sidecar_path(out), json.dumps(side, indent=1) + "\n")
    return out


class TRTRunner:
    """A deserialised engine run on PyTorch CUDA tensors with ``execute_async_v3``, no pycuda.

    ``runner(x)`` takes a (B, C, H, W) CUDA tensor and returns the output as a new CUDA tensor.
    ``execute_async_v3`` is enqueued on ``stream`` (default: a stream of the runner's own, made
    on first use), never on the legacy default stream, on which TensorRT adds synchronisations
    of its own. The stream first waits for PyTorch's current stream (so it sees the input) and
    the current stream then waits for it (so later PyTorch work sees the output), as any
    side-stream work does; the tensors are marked as used on that stream.
    """

    def __init__(self, engine_path: str | Path) -> None:
        self._trt = trt = require_tensorrt()
        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {path}")
        self.path = path
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: not a TensorRT engine this TensorRT {trt.__version__} and GPU can load")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = self._io_names()
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.stream: torch.cuda.Stream | None = None  # made on first call, on the input's device

    def _io_names(self) -> tuple[str, str]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self._trt.TensorIOMode
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected one input and one output, found {inputs} -> {outputs}")
        return inputs[0], outputs[0]

    def __call__(self, x: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        if not x.is_cuda:
            raise ValueError("TRTRunner needs a CUDA tensor; move the input with .cuda()")
        x = x.to(self.input_dtype).contiguous()  # (B, C, H, W)
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(f"input shape {tuple(x.shape)} is outside the engine's batch range "
                             f"{self.batch_range[0]}..{self.batch_range[1]}")
        if stream is None:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=x.device)
            stream = self.stream
        caller = torch.cuda.current_stream(x.device)
        stream.wait_stream(caller)  # the input (and its cast) are written on the caller's stream
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        with torch.cuda.stream(stream):
            out = torch.empty(shape, dtype=self.output_dtype, device=x.device)  # (B, K)
        x.record_stream(stream)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        caller.wait_stream(stream)  # later work on the caller's stream sees the output
        out.record_stream(caller)
        return out

    def layer_report(self) -> dict[str, Any]:
        """The inspector's per-layer JSON plus counts of all and of reformat/copy layers."""
        inspector = self.engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))
        layers = info.get("Layers", []) if isinstance(info, dict) else []
        reformats = [_layer_name(la) for la in layers if _is_reformat(la)]
        return {"num_layers": len(layers), "reformat_layers": len(reformats),
                "reformat_layer_names": reformats, "engine_information": info}


def sidecar_path(out: Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    return out.with_name(out.name + ".json")


def layers_path(out: Path) -> Path:
    """``model.engine`` -> ``model.engine.layers.json``."""
    return out.with_name(out.name + ".layers.json")


def calib_path(out: Path) -> Path:
    """``model.engine`` -> ``model.engine.calib`` (the INT8 calibration cache)."""
    return out.with_name(out.name + ".calib")


def _check_settings(s: BuildSettings) -> None:
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision {s.precision!r} is not one of {', '.join(PRECISIONS)}")
    if not 1 <= s.min_batch <= s.opt_batch <= s.max_batch:
        raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got "
                         f"{s.min_batch}, {s.opt_batch}, {s.max_batch}")
    if s.workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {s.workspace_gb}")


def _read_onnx(path: Path, s: BuildSettings) -> OnnxInput:
    """The file's bytes, input name and (C, H, W); one-line errors for garbage or bad shapes.

    A model with external data (``NAME.onnx.data``, see :mod:`export.onnx_files`) is read as its
    graph alone; its data file is checked here and read by the parser from the model's folder.
    """
    import onnx

    from export.onnx_files import check_external_data, external_files

    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # DecodeError, ...
        raise ValueError(f"{path}: not a valid ONNX model ({type(e).__name__}: {first_line(e)})") from None
    check_external_data(path, proto)
    # a model with external data is checked on its path (in memory the checker would look for the
    # data in the working directory); a single-file one on the bytes already read, not read again
    try:
        onnx.checker.check_model(str(path) if external_files(path, proto) else proto)
    except Exception as e:  # ValidationError, ...
        raise ValueError(f"{path}: not a valid ONNX model ({type(e).__name__}: {first_line(e)})") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one (B, C, H, W) input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(d.dim_value for d in dims[1:])
    if len(dims) != 4 or not all(chw):
        raise ValueError(f"{path}: input {inputs[0].name} must be (B, C, H, W) with static C, H, W")
    static = dims[0].dim_value
    if static and not s.min_batch == s.max_batch == static:
        raise ValueError(f"{path}: the batch axis is static ({static}); export it with a dynamic "
                         f"batch or set min=opt=max batch={static}")
    float_type, has_qdq = onnx_typing(proto)
    return OnnxInput(path, data, inputs[0].name, chw, float_type, has_qdq)


def _build(trt: Any, onnx_in: OnnxInput, s: BuildSettings, plan: BuildPlan, calib: Any) -> bytes:
    """Parse, configure (precision, profile, workspace, timing cache, calibrator) and build."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    # ``path`` lets the parser find external weights (NAME.onnx.data) relative to the model
    if not parser.parse(onnx_in.data, path=str(onnx_in.path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_in.path}: TensorRT's ONNX parser rejected it: {errors or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_gb * 2**30))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _set_flags(trt, config, plan)
    profile = builder.create_optimization_profile()
    profile.set_shape(onnx_in.input_name, *((b, *onnx_in.chw) for b in (s.min_batch, s.opt_batch, s.max_batch)))
    config.add_optimization_profile(profile)
    if calib is not None:
        _set_calibrator(builder, config, calib, onnx_in.input_name, onnx_in.chw)
    _load_timing_cache(config, s.timing_cache)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ValueError(f"TensorRT could not build an engine from {onnx_in.path} (see its log above)")
    _save_timing_cache(config, s.timing_cache)
    return bytes(blob)


def _network_flags(trt: Any, plan: BuildPlan) -> int:
    """0 (explicit batch is the only mode since TensorRT 10), plus STRONGLY_TYPED for a strong
    build when the enum still has it (TensorRT 11 keeps it, ignored: strong typing is always on)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if plan.strongly_typed else None
    return 1 << int(flag) if flag is not None else 0


def _set_flags(trt: Any, config: Any, plan: BuildPlan) -> None:
    """Set and clear the plan's builder flags: fp32 turns TF32 off (TensorRT enables it by
    default); weakly typed int8 adds fp16 as a fallback."""
    for name in plan.clear_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:  # not expected (TF32 survives in 11.x), but say so instead of crashing
            log.warning("TensorRT %s has no BuilderFlag.%s to clear", trt.__version__, name)
            continue
        config.clear_flag(flag)
    for name in plan.set_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; the {plan.typing}ly "
                             f"typed build for this precision needs it")
        config.set_flag(flag)


def _set_calibrator(builder: Any, config: Any, calib: Any, input_name: str, chw: tuple[int, ...]) -> None:
    """INT8 calibration on a fixed-shape profile at the calibration batch size."""
    shape = (calib.get_batch_size(), *chw)
    cal_profile = builder.create_optimization_profile()
    cal_profile.set_shape(input_name, shape, shape, shape)
    config.set_calibration_profile(cal_profile)
    config.int8_calibrator = calib


def _load_timing_cache(config: Any, path: Path | None) -> None:
    """Attach a timing cache (read from ``path`` if it exists) so tactic timings are reused."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(blob), False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path | None) -> None:
    """Write the cache, now holding this build's tactic timings too, back to ``path``."""
    if path is not None:
        write_bytes_atomic(path, bytes(config.get_timing_cache().serialize()))
        log.info("timing cache written to %s", path)


def _calibration(trt: Any, batches: Iterable[torch.Tensor] | None, cache: Path, chw: tuple[int, ...]) -> Any:
    """An entropy calibrator for an implicitly calibrated int8 build (``BuildPlan.calibrate``)."""
    data = [b for b in (batches or []) if tuple(b.shape[1:]) == chw]
    if data:
        size = data[0].shape[0]
        data = [b for b in data if b.shape[0] == size]
    elif not cache.is_file():
        raise ValueError(f"int8 needs calibration batches of shape (B, {', '.join(map(str, chw))}) "
                         f"or an existing calibration cache at {cache}")
    return _entropy_calibrator(trt, data, cache)


def _entropy_calibrator(trt: Any, batches: list[torch.Tensor], cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` fed from ``batches``; its scales are cached in ``cache``."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches: Iterator[torch.Tensor] = iter(batches)
            self._size = int(batches[0].shape[0]) if batches else 1
            self._current: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return self._size

        def get_batch(self, names: list[str]) -> list[int] | None:
            x = next(self._batches, None)
            if x is None:
                return None
            self._current = x.float().contiguous().cuda()  # (B, C, H, W)
            torch.cuda.current_stream().synchronize()
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            write_bytes_atomic(cache, bytes(data))
            log.info("INT8 calibration cache written to %s", cache)

    return EntropyCalibrator()


def _verify(runner: TRTRunner, onnx_in: OnnxInput, model: nn.Module | None, s: BuildSettings,
            rtol: float | None, atol: float | None) -> dict[str, Any]:
    """Parity of the engine against PyTorch on the GPU (or ONNX Runtime without a model)."""
    reference, against = _reference(onnx_in.path, model)
    batches = batches_in_range(s.min_batch, s.max_batch)
    r, a = tolerance(s.precision, reference, onnx_in.chw, rtol, atol)

    def run(x: torch.Tensor) -> torch.Tensor:
        return runner(x.cuda()).float().cpu()

    diffs = check_parity(run, reference, onnx_in.chw, batches, rtol=r, atol=a,
                         what=f"TensorRT {s.precision} engine vs {against}")
    return {"against": against, "max_abs_diff": {str(b): d for b, d in diffs.items()}, "rtol": r, "atol": a}


def _reference(onnx_path: Path, model: nn.Module | None) -> tuple[Any, str]:
    if model is None:
        from export.to_onnx import open_session

        session = open_session(onnx_path)
        name = session.get_inputs()[0].name
        return (lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])), "ONNX Runtime (CPU)"
    gpu_model = copy.deepcopy(model).eval().cuda()

    def reference(x: torch.Tensor) -> torch.Tensor:
        with _strict_fp32():
            return gpu_model(x.cuda()).float().cpu()

    return reference, "PyTorch fp32 (CUDA)"


def _tf32_switches() -> list[tuple[Any, str, Any]]:
    """(object, attribute, the value that means strict fp32) of every TF32 switch to turn off.

    torch >= 2.9 has ``fp32_precision`` ("ieee" = strict fp32, "tf32", "none" = inherit) on
    ``torch.backends.cuda.matmul`` and ``torch.backends.cudnn.conv``; reading the legacy
    ``allow_tf32`` flags raises there once anything set the new API, so the new API is used
    wherever it exists and the legacy flags only on older torch.
    """
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        return [(matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """Turn TF32 off for the reference, so that it is an fp32 ground truth; restore after."""
    switches = _tf32_switches()
    saved = [getattr(obj, attr) for obj, attr, _ in switches]
    for obj, attr, strict in switches:
        setattr(obj, attr, strict)
    try:
        yield
    finally:
        for (obj, attr, _), value in zip(switches, saved):
            setattr(obj, attr, value)


def _sidecar(trt: Any, s: BuildSettings, seconds: float, parity: dict[str, Any] | None,
             layers: dict[str, Any], onnx_in: OnnxInput, plan: BuildPlan, calib: Any,
             metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    major, minor = torch.cuda.get_device_capability()
    settings = asdict(s)
    settings["timing_cache"] = str(s.timing_cache) if s.timing_cache else None
    return {"format": SIDECAR_FORMAT, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}", **settings,
            "profile": {"min": s.min_batch, "opt": s.opt_batch, "max": s.max_batch},
            "build_seconds": round(seconds, 3), "parity": parity, "num_layers": layers["num_layers"],
            "reformat_layers": layers["reformat_layers"], "onnx": str(onnx_in.path),
            "typing": plan.typing, "onnx_float_type": onnx_in.float_type, "onnx_qdq": onnx_in.has_qdq,
            "builder_flags": list(plan.set_flags), "int8_calibrated": calib is not None,
            **dict(metadata or {})}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
             "uint8": torch.uint8}
    for name, torch_dtype in table.items():
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise ValueError(f"engine tensor type {dtype} has no PyTorch equivalent here")


def _layer_name(layer: Any) -> str:
    return str(layer.get("Name", "")) if isinstance(layer, dict) else str(layer)


def _is_reformat(layer: Any) -> bool:
    """Reformat/copy layers: TensorRT's layout conversions between kernels."""
    kind = str(layer.get("LayerType", "")) if isinstance(layer, dict) else ""
    text = f"{kind} {_layer_name(layer)}".lower()
    return "reformat" in text or "copynode" in text or kind.lower() == "copy"


def _from_model_dir(model: nn.Module, plan: ModelPlan, out: Path, *, source: Path | None, opset: int = 18,
                    simplify: bool = False, verify: bool = True, calib_batches: int = 16,
                    calib_batch_size: int = 32, **build: Any) -> Path:
    """Export the ONNX graph to a temporary folder, then build and verify the engine from it.

    On TensorRT 11+ an fp16 engine is built from an fp16-typed export (strong typing takes the
    precision from the graph); precisions it cannot get from a model directory (bf16, int8
    without Q/DQ nodes) fail here, before the slow export.
    """
    import tempfile

    from export.calibration import calibration_batches
    from export.to_onnx import export_onnx

    major = tensorrt_major(require_tensorrt())  # fail before the (slow) ONNX export
    precision = build.get("precision", DEFAULT_PRECISION)
    onnx_precision = onnx_precision_for(major, precision)
    build_plan = plan_build(major, precision, onnx_precision, has_qdq=False)
    ensure_writable(out, force=bool(build.get("force")))
    meta = provenance(model, plan, source)
    calib = None
    if build_plan.calibrate and not calib_path(out).is_file():
        calib = calibration_batches(plan, count=calib_batches, batch_size=calib_batch_size)
    with tempfile.TemporaryDirectory(prefix="deploy-prune-trt-") as tmp:
        onnx_path = export_onnx(model, plan.example(2), Path(tmp) / "model.onnx", opset=opset,
                                simplify=simplify, verify=verify, metadata=meta, precision=onnx_precision)
        return build_engine(onnx_path, out, model=model, verify=verify, calibration_batches=calib,
                            metadata=meta, **build)


FORMATS.register("tensorrt")(FormatSpec(
    export=_from_model_dir, suffix=".engine",
    options=COMMON_OPTIONS | {"precision", "min_batch", "opt_batch", "max_batch", "workspace_gb",
                              "timing_cache", "calib_batches", "calib_batch_size", "opset", "simplify"},
    help="TensorRT engine built from the ONNX graph (needs tensorrt and a CUDA GPU)"))
