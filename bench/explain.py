"""``deploy-prune bench explain``: where the time went, layer by layer, base against slim.

A FLOPs reduction turns into only part of a speedup; this says which layers kept their time.
Base and slim are first timed against each other with the bench's paired, interleaved timing
(:func:`bench.sweep.measure_batch`: the end-to-end latencies and the speedup). Then each is run
again under the backend's own profiler and every profiled event is mapped back to
deploy-prune's nodes:

- ``ort``: ONNX Runtime's profiler (``SessionOptions.enable_profiling``; ``end_profiling``
  writes a JSON trace whose ``Node`` events carry the node name, ``args.op_name`` and ``dur``
  in microseconds). Its node names are those of the *optimized* graph (fused Conv+BN+ReLU,
  NCHWc ``Reorder`` nodes), so the session also saves that graph (``optimized_model_filepath``)
  and each optimized node is traced back through the exported graph to the ``Conv`` or
  ``Gemm`` whose weight initializer carries the module path (``features.3.weight``).
- ``torch`` (eager): on the CPU, forward hooks time each leaf module on the thread's CPU clock
  (a profiler's wall-clock events include the time other jobs held a shared core) and
  ``torch.profiler`` names the ops between modules (residual adds, flatten); on CUDA,
  ``torch.profiler`` kernel time under one ``record_function`` range per leaf module
  (``with_modules`` records the hierarchy for TorchScript only). BatchNorm and activation
  modules are charged to the conv that ran before them.
- ``tensorrt``: the per-layer ``IProfiler`` (``report_layer_time``), layer names split at
  ``" + "`` (fused layers) and mapped like ONNX nodes; imported lazily and skipped with the
  reason where TensorRT is absent. ``compile`` is refused: Inductor fuses across modules.

Everything else is a named row: pooling, classifier, layout reorders, reshapes/copies,
unfused element-wise ops, the backend's own overhead inside a call (executor, dispatch), the
per-call overhead outside it (Python binding, input/output conversion), and the gap between
the measured end-to-end latency and the profiled sum (profiler overhead when negative).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.backends import Artifact, Backend
from bench.timing import CLOCKS
from deploy_prune.flops import count
from deploy_prune.nodes import Node, discover

log = logging.getLogger(__name__)

EXPLAIN_BACKENDS = ("ort", "torch", "tensorrt")
# Row kinds, in the order the table lists them after the nodes.
KINDS = ("node", "conv", "classifier", "pooling", "layout", "copies", "elementwise", "other",
         "executor", "per-call overhead", "gap")
OVERHEAD_KINDS = ("per-call overhead",)
LAYOUT_ROW = "layout reorders"
POOL_ROW = "pooling"
COPY_ROW = "reshape / copies"
ELEMENTWISE_ROW = "element-wise (unfused)"
EXECUTOR_ROW = "executor (allocation, between kernels)"
CALL_ROW = "per-call overhead (binding, executor, input/output)"
GAP_ROW = "gap: measured - profiled"

_LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Transpose", "Reformat", "aten::contiguous",
               "aten::to", "aten::_to_copy"}
_POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "aten::max_pool2d",
             "aten::adaptive_avg_pool2d", "aten::avg_pool2d", "aten::mean"}
_COPY_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Cast", "Copy",
             "MemcpyToHost", "MemcpyFromHost", "Slice", "Gather", "Shape", "Expand",
             "aten::flatten", "aten::view", "aten::reshape", "aten::cat", "aten::copy_",
             "aten::clone", "aten::empty", "aten::detach"}
_ELEMENTWISE_OPS = {"Relu", "Add", "Sum", "Mul", "Div", "Sub", "Clip", "Sigmoid", "HardSigmoid",
                    "HardSwish", "LeakyRelu", "Tanh", "BatchNormalization", "aten::add",
                    "aten::add_", "aten::relu", "aten::relu_", "aten::mul", "aten::batch_norm",
                    "aten::hardtanh_", "aten::hardswish_", "aten::silu_", "aten::sigmoid"}
_MATMUL_OPS = {"Gemm", "MatMul", "FusedGemm", "FusedMatMul", "aten::linear", "aten::addmm",
               "aten::matmul", "aten::mm"}
# ONNX ops whose weight (input 1) names the module; and ops a fused node may have absorbed.
_ANCHOR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "QLinearConv"}
_PASS_OPS = {"Relu", "BatchNormalization", "Add", "Sum", "Clip", "Sigmoid", "Mul", "LeakyRelu",
             "HardSigmoid", "HardSwish", "Tanh", "Identity", "Div"}
_ACT_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
                nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.GroupNorm,
                nn.LayerNorm)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def op_row(op: str) -> tuple[str, str]:
    """(row name, kind) of a profiled op that maps to no module."""
    if op in _LAYOUT_OPS or op.startswith("Reorder") or op.startswith("Reformatting"):
        return LAYOUT_ROW, "layout"
    if op in _POOL_OPS:
        return POOL_ROW, "pooling"
    if op in _COPY_OPS:
        return COPY_ROW, "copies"
    if op in _ELEMENTWISE_OPS:
        return ELEMENTWISE_ROW, "elementwise"
    if op in _MATMUL_OPS:
        return "classifier (unmapped matmul)", "classifier"
    return f"other: {op}", "other"


# ---------------------------------------------------------------------------------------------
# module path -> row


@dataclass
class RowMap:
    """Which row each module's time and FLOPs belong to (built once, on the base model)."""

    nodes: list[Node]
    rows: dict[str, tuple[str, str]]  # module path -> (row, kind)
    kinds: dict[str, str] = field(default_factory=dict)  # row -> kind

    def row_of(self, module: str) -> tuple[str, str] | None:
        return self.rows.get(module)


def build_rowmap(model: nn.Module, example: torch.Tensor, nodes: list[Node] | None = None) -> RowMap:
    """Convs and their BN gates -> their node; Linear -> its own classifier row; pools -> pooling."""
    nodes = nodes if nodes is not None else discover(model, example)
    rows: dict[str, tuple[str, str]] = {}
    for n in nodes:
        for m in (*n.producers, *n.gates):
            rows[m] = (n.name, "node")
    for name, m in model.named_modules():
        if name in rows:
            continue
        if isinstance(m, nn.Conv2d):
            rows[name] = (f"conv {name}", "conv")
        elif isinstance(m, nn.Linear):
            rows[name] = (name, "classifier")
        elif isinstance(m, _POOL_MODULES):
            rows[name] = (POOL_ROW, "pooling")
    kinds = {r: k for r, k in rows.values()}
    return RowMap(nodes=nodes, rows=rows, kinds=kinds)


def node_widths(model: nn.Module, nodes: list[Node]) -> dict[str, int]:
    """Each node's channel count in ``model`` (its root conv's ``out_channels``)."""
    mods = dict(model.named_modules())
    return {n.name: int(getattr(mods[n.root], "out_channels", None) or mods[n.root].out_features)
            for n in nodes if n.root in mods}  # a Linear root: an MLP head's hidden units, or ConvNeXt's MLP


def row_flops(model: nn.Module, example: torch.Tensor, rowmap: RowMap) -> tuple[dict[str, int], int]:
    """FLOPs (batch 1) per row, and the model's total, from :func:`deploy_prune.flops.count`."""
    cost = count(model, example)
    out: dict[str, int] = defaultdict(int)
    for module, f in cost.per_module.items():
        hit = rowmap.row_of(module)
        out[hit[0] if hit else "other: unmapped modules"] += f
    return dict(out), cost.flops


# ---------------------------------------------------------------------------------------------
# profiles


@dataclass
class CallProfile:
    """One profiled inference, already mapped to rows (milliseconds)."""

    rows: dict[str, float]  # row -> ms (model rows only)
    kinds: dict[str, str]  # row -> kind
    inside_ms: float  # the backend's own time for the call (ORT model_run, the forward range)
    call_ms: float  # host time around upload + run + download of this call
    plain_ms: float = math.nan  # an unprofiled call made right before it (same clock)
    clean: bool = True  # neither call was preempted (CPU time >= CLEAN x wall time)
    scale: float = 1.0  # CPU / wall time of the profiled call: brings wall-clock events to the CPU clock
    sub: dict[str, float] = field(default_factory=dict)  # ms to take off each row (profiler's own cost)

    def adjusted(self, scaled: bool) -> dict[str, float]:
        k = self.scale if scaled else 1.0
        return {r: max(0.0, k * ms - self.sub.get(r, 0.0)) for r, ms in self.rows.items()}


@dataclass
class Profile:
    """Per-row median times over the profiled calls of one variant."""

    rows: dict[str, float]
    kinds: dict[str, str]
    inside_ms: float
    call_ms: float
    calls: int
    source: str  # which profiler, in words
    plain_ms: float = math.nan  # median unprofiled call, interleaved with the profiled ones
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (profiled rows ms, unprofiled ms) per call

    clean_calls: int = 0

    @classmethod
    def of(cls, calls: list[CallProfile], source: str) -> Profile:
        """Medians over the calls; over the clean ones only (no preemption in the profiled call or
        the unprofiled one beside it) when there are enough of them: on a shared machine a
        preempted call also runs slower on the CPU clock (caches refilled after the other job)."""
        if not calls:
            raise ValueError("the profiler recorded no complete call")
        clean = [c for c in calls if c.clean]
        n_clean = len(clean)
        scaled = n_clean < max(5, len(calls) // 4)
        if not scaled:
            calls = clean
        elif any(c.scale != 1.0 for c in calls):
            # mostly preempted (long calls on a busy machine): each call's wall-clock events are
            # scaled by its CPU / wall time, the preemption spread evenly over the call
            source += "; events scaled by each call's CPU / wall time (too few unpreempted calls)"
        adjusted = [c.adjusted(scaled) for c in calls]

        def stat(values: list[float]) -> float:
            return float(np.median(values))

        names = {r for c in calls for r in c.rows}
        kinds = {r: k for c in calls for r, k in c.kinds.items()}
        rows = {r: stat([a.get(r, 0.0) for a in adjusted]) for r in names}
        # per-row medians need not add up to the median call: share that call's total out
        total, typical = sum(rows.values()), stat([sum(a.values()) for a in adjusted])
        if total > 0 and typical > 0:
            rows = {r: ms * typical / total for r, ms in rows.items()}
        return cls(rows=rows, kinds=kinds, inside_ms=stat([c.inside_ms for c in calls]),
                   call_ms=stat([c.call_ms for c in calls]), calls=len(calls), source=source,
                   plain_ms=stat([c.plain_ms for c in calls]),
                   pairs=[(sum(a.values()), c.plain_ms) for a, c in zip(adjusted, calls, strict=True)],
                   clean_calls=n_clean)


CLEAN = 0.9  # a call whose CPU time is at least this fraction of its wall time was not preempted


class CallClock:
    """Times one call on ``clock`` (``ms``) and says whether the OS preempted it: profilers time
    events on the wall clock, which on a shared machine includes the time other jobs held the
    core; ``clean`` calls (CPU time >= ``CLEAN`` x wall time) were not preempted."""

    def __init__(self, clock: str) -> None:
        self.clock = clock
        self.ms, self.scale, self.clean = 0.0, 1.0, True

    def __enter__(self) -> CallClock:
        self.w0, self.c0 = time.perf_counter_ns(), time.process_time_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter_ns() - self.w0
        cpu = time.process_time_ns() - self.c0
        self.clean = wall <= 0 or cpu >= CLEAN * wall
        if self.clock == "cpu" and wall > 0:
            self.scale = min(1.0, cpu / wall)
            self.ms = cpu / 1e6
        else:
            self.ms = wall / 1e6


def _add(rows: dict[str, float], kinds: dict[str, str], row: str, kind: str, ms: float) -> None:
    rows[row] = rows.get(row, 0.0) + ms
    kinds.setdefault(row, kind)


# --- ONNX graph mapping ----------------------------------------------------------------------


def _module_of_weight(name: str, modules: set[str]) -> str | None:
    """``features.3.weight`` -> ``features.3`` when that is a module of the model."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix) and name[: -len(suffix)] in modules:
            return name[: -len(suffix)]
    return None


class OnnxMapper:
    """Maps names of (optimized, fused) ONNX nodes back to module paths of the exported model."""

    def __init__(self, graph: Any, modules: set[str]) -> None:
        self.modules = modules
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.inits = {i.name for i in graph.initializer}

    def _weight_module(self, node: Any) -> str | None:
        for i in node.input[1:]:
            m = _module_of_weight(i, self.modules)
            if m:
                return m
        return None

    def anchor(self, node: Any) -> str | None:
        """The module of the conv/matmul that ``node`` is (or follows through BN, activation, add)."""
        seen = 0
        while node is not None and seen < 64:
            seen += 1
            if node.op_type in _ANCHOR_OPS:
                return self._weight_module(node)
            if node.op_type not in _PASS_OPS:
                return None
            ups = [self.producer[i] for i in node.input if i in self.producer]
            if not ups:
                return None
            convs = [u for u in ups if u.op_type in _ANCHOR_OPS]
            # an Add fused into a conv: the conv that feeds it directly, the latest one if two
            node = max(convs or ups, key=lambda u: self.index[id(u)])
        return None

    def original(self, name: str, outputs: Iterable[str] = ()) -> Any:
        """The exported-graph node an optimized node stands for (by name, else by output tensor)."""
        stem = name
        for suffix in ("_kernel_time", "_nchwc"):
            stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
        if stem in self.by_name:
            return self.by_name[stem]
        if stem in self.producer:
            return self.producer[stem]
        for o in outputs:
            if o in self.producer:
                return self.producer[o]
        return None

    def module(self, name: str, outputs: Iterable[str] = (), inputs: Iterable[str] = ()) -> str | None:
        node = self.original(name, outputs)
        if node is not None:
            return self.anchor(node)
        for i in inputs:  # a renamed fused node that kept its weight's name
            m = _module_of_weight(i, self.modules)
            if m:
                return m
        return None


def map_onnx_event(mapper: OnnxMapper, rowmap: RowMap, name: str, op: str,
                   outputs: Iterable[str] = (), inputs: Iterable[str] = ()) -> tuple[str, str]:
    """(row, kind) of one profiled ONNX/TensorRT node; layout conversions by their op first
    (a ``ReorderOutput`` takes over the name of the tensor it converts back)."""
    by_op = op_row(op)
    if by_op[1] == "layout":
        return by_op
    module = mapper.module(name, outputs, inputs)
    hit = rowmap.row_of(module) if module else None
    return hit if hit else by_op


# --- ONNX Runtime ----------------------------------------------------------------------------


def profile_ort(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module, *,
                calls: int, warmup: int, workdir: Path, clock: str, event_ms: float = 0.0,
                gap_ms: float = 0.0) -> Profile:
    """Profile ``calls`` runs of the ``ort`` backend's ONNX file in a profiling session."""
    import onnx
    import onnxruntime as ort

    from export.onnx_files import external_files
    from export.to_onnx import EXTERNAL_MIN_BYTES

    workdir.mkdir(parents=True, exist_ok=True)
    so = backend.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "ort-profile")
    so.optimized_model_filepath = str(workdir / "optimized.onnx")
    if external_files(backend.path):  # a model past 2 GiB: its optimised copy needs external data too
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(EXTERNAL_MIN_BYTES))
    providers = backend.providers(None, host) if backend.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(backend.path), sess_options=so, providers=providers)
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    x = host.contiguous().numpy()
    call_ms, plain, clean, scales = [], [], [], []
    for i in range(warmup + calls):
        # each timed call follows an untimed one of the same session (warm caches, as in the
        # paired timing): the timed backend itself, unprofiled, for the load drift; then profiled
        backend.download(backend.run(backend.upload(host)))
        with CallClock(clock) as pc:
            backend.download(backend.run(backend.upload(host)))
        sess.run([name_out], {name_in: x})
        with CallClock(clock) as cc:
            sess.run([name_out], {name_in: x})
        if i >= warmup:
            call_ms.append(cc.ms)
            plain.append(pc.ms)
            clean.append(pc.clean and cc.clean)
            scales.append(cc.scale)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    modules = {n for n, _ in model.named_modules()}
    exported = OnnxMapper(onnx.load(str(backend.path), load_external_data=False).graph, modules)
    optimized = {n.name: n for n in onnx.load(str(workdir / "optimized.onnx"), load_external_data=False).graph.node}
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    runs = runs[len(runs) - 2 * (warmup + calls):]  # any earlier run is the session's own
    runs = runs[1::2]  # the timed ones
    per_run: list[list[dict]] = [[] for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= k < len(runs) and e["ts"] <= runs[k]["ts"] + runs[k]["dur"]:
            per_run[k].append(e)
    cache: dict[str, tuple[str, str]] = {}
    out = []
    for run, evs, c_ms, p_ms, ok, scale in zip(runs[warmup:], per_run[warmup:], call_ms, plain, clean, scales,
                                               strict=False):
        rows: dict[str, float] = {}
        kinds: dict[str, str] = {}
        sub: dict[str, float] = defaultdict(float)
        for e in evs:
            name = e["name"][: -len("_kernel_time")]
            if name not in cache:
                opt = optimized.get(name)
                cache[name] = map_onnx_event(exported, rowmap, name, e.get("args", {}).get("op_name", "?"),
                                             list(opt.output) if opt is not None else (),
                                             list(opt.input) if opt is not None else ())
            row, kind = cache[name]
            _add(rows, kinds, row, kind, e["dur"] / 1000.0)
            sub[row] += event_ms
        kernels = sum(e["dur"] / 1000.0 for e in evs)
        _add(rows, kinds, EXECUTOR_ROW, "executor", max(0.0, run["dur"] / 1000.0 - kernels))
        sub[EXECUTOR_ROW] += len(evs) * gap_ms
        out.append(CallProfile(rows=rows, kinds=kinds, inside_ms=run["dur"] / 1000.0, call_ms=c_ms,
                               plain_ms=p_ms, clean=ok, scale=scale, sub=dict(sub)))
    trace.unlink(missing_ok=True)
    return Profile.of(out, "onnxruntime profiler (SessionOptions.enable_profiling), optimized-graph nodes")


# --- PyTorch eager ---------------------------------------------------------------------------

_RANGE = "dp.module::"
_FORWARD = "dp.forward"


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def _module_ranges(model: nn.Module) -> Callable[[], None]:
    """A ``record_function`` range around every leaf module call; returns the remover."""
    from torch.autograd.profiler import record_function

    stack: list[Any] = []
    handles = []
    for name, m in _leaf_modules(model):
        def pre(mod, args, name=name):
            rf = record_function(_RANGE + name)
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, out):
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


def _event_ms(ev: Any, cuda: bool) -> float:
    if cuda:
        dev = getattr(ev, "device_time_total", None)
        return float(dev if dev is not None else ev.cuda_time_total) / 1000.0
    return float(ev.cpu_time_total) / 1000.0


def map_torch_forward(children: list[Any], rowmap: RowMap, model: nn.Module, cuda: bool, *,
                      scale: float = 1.0, event_ms: float = 0.0) -> tuple[dict, dict]:
    """Rows of one forward: module ranges by the row map, BN/activations to the conv before them.

    Each event's time is multiplied by ``scale`` (see :class:`CallClock`) and a module range
    loses ``event_ms``, the cost of the range itself (hooks + ``record_function``, calibrated)."""
    mods = dict(model.named_modules())
    rows: dict[str, float] = {}
    kinds: dict[str, str] = {}
    current: tuple[str, str] | None = None
    for ev in sorted(children, key=lambda e: e.time_range.start):
        ms = _event_ms(ev, cuda) * (1.0 if cuda else scale)
        if ev.name.startswith(_RANGE):
            ms = max(0.0, ms - (0.0 if cuda else event_ms))
            name = ev.name[len(_RANGE):]
            hit = rowmap.row_of(name)
            if hit and hit[1] in ("node", "conv"):
                current = hit
            elif hit is None and isinstance(mods.get(name), _ACT_MODULES) and current is not None:
                hit = current
            elif hit is None:
                hit = op_row(type(mods.get(name)).__name__) if name in mods else ("other: module", "other")
                if hit[1] == "other" and isinstance(mods.get(name), nn.Flatten | nn.Dropout):
                    hit = (COPY_ROW, "copies")
            _add(rows, kinds, *hit, ms)
        else:
            _add(rows, kinds, *op_row(ev.name), ms)
    return rows, kinds


OUTSIDE_ROW = "between modules (Python, module calls)"


def _clock_ns(clock: str) -> Callable[[], int]:
    """Thread CPU time for the ``cpu`` clock (one thread does all the work), else wall time."""
    return time.thread_time_ns if clock == "cpu" else time.perf_counter_ns


def _module_clock(model: nn.Module, clock: str = "cpu") -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """Hooks that record each leaf module call's time (ns) on ``clock``, in call order."""
    tick = _clock_ns(clock)
    records: list[tuple[str, int]] = []
    stack: list[int] = []
    handles = []
    for name, m in _leaf_modules(model):
        def pre(mod, args):
            stack.append(tick())

        def post(mod, args, out, name=name):
            records.append((name, tick() - stack.pop()))

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return records, remove


def _outside_shares(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module,
                    calls: int) -> dict[str, tuple[float, str]]:
    """torch.profiler over a few calls: each op row outside the leaf modules (residual adds,
    flatten, ...) as a fraction of the forward's time."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    remove = _module_ranges(backend.model)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                x = backend.upload(host)
                with record_function(_FORWARD):
                    backend.run(x)
    finally:
        remove()
    fracs: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    forwards = [e for e in prof.events() if e.name == _FORWARD]
    for ev in forwards:
        total = max(float(ev.cpu_time_total), 1e-9)
        rows: dict[str, float] = defaultdict(float)
        for ch in ev.cpu_children:
            if not ch.name.startswith(_RANGE):
                row, kind = op_row(ch.name)
                rows[row] += ch.cpu_time_total / total
                kinds[row] = kind
        for r in kinds:
            fracs[r].append(rows.get(r, 0.0))
    return {r: (float(np.median(v)), kinds[r]) for r, v in fracs.items()}


def profile_torch(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module, *,
                  calls: int, warmup: int, clock: str, event_ms: float = 0.0,
                  hook_ms: float = 0.0) -> Profile:
    """Per-module time of eager calls.

    CPU: each leaf module's thread CPU time from forward hooks (robust on a shared machine,
    where a profiler's wall-clock events include the time other jobs held the core), less the
    calibrated cost of the hooks (``event_ms`` inside a module's interval, ``hook_ms`` outside
    it); the time between modules is split into op rows (residual adds, flatten) by
    ``torch.profiler``'s view of a few calls, the rest is Python between modules.
    CUDA: ``torch.profiler``'s kernel time under a ``record_function`` range per leaf module.
    """
    if backend.device == "cuda":
        return _profile_torch_cuda(backend, host, rowmap, model, calls=calls, warmup=warmup)
    mods = dict(model.named_modules())
    tick = _clock_ns(clock)
    out = []
    for _ in range(warmup):
        backend.download(backend.run(backend.upload(host)))
    for _ in range(calls):
        # each timed call follows an untimed one of the same kind (warm caches, as in the paired
        # timing): an unprofiled call first, for the load drift, then the hooked one
        backend.download(backend.run(backend.upload(host)))
        with CallClock(clock) as pc:
            backend.download(backend.run(backend.upload(host)))
        plain = pc.ms
        records, remove = _module_clock(backend.model, clock)
        backend.download(backend.run(backend.upload(host)))
        records.clear()
        w0 = time.perf_counter_ns()
        try:
            c0 = tick()
            x = backend.upload(host)
            f0 = tick()
            y = backend.run(x)
            f1 = tick()
            backend.download(y)
            c1 = tick()
        finally:
            remove()
        ok = pc.clean and (c1 - c0) >= CLEAN * (time.perf_counter_ns() - w0)
        rows: dict[str, float] = {}
        kinds: dict[str, str] = {}
        current: tuple[str, str] | None = None
        for name, ns in records:
            hit = _module_row(name, mods, rowmap, current)
            if hit[1] in ("node", "conv"):
                current = hit
            _add(rows, kinds, *hit, max(0.0, ns / 1e6 - event_ms))
        forward = (f1 - f0) / 1e6 - len(records) * (event_ms + hook_ms)
        _add(rows, kinds, OUTSIDE_ROW, "other", max(0.0, forward - sum(rows.values())))
        out.append(CallProfile(rows=rows, kinds=kinds, inside_ms=forward, plain_ms=plain, clean=ok,
                               call_ms=(c1 - c0) / 1e6 - len(records) * (event_ms + hook_ms)))
    shares = _outside_shares(backend, host, rowmap, model, max(2, min(5, calls)))
    for c in out:
        outside = c.rows.get(OUTSIDE_ROW, 0.0)
        for row, (frac, kind) in shares.items():
            ms = min(outside, frac * c.inside_ms)
            _add(c.rows, c.kinds, row, kind, ms)
            outside -= ms
        c.rows[OUTSIDE_ROW] = outside
    what = "thread CPU time" if clock == "cpu" else "wall time"
    return Profile.of(out, f"{what} per leaf module (forward hooks); ops between modules named by torch.profiler")


def _module_row(name: str, mods: dict[str, nn.Module], rowmap: RowMap,
                current: tuple[str, str] | None) -> tuple[str, str]:
    """A leaf module's row: by the row map, BN/activation to the conv before it."""
    hit = rowmap.row_of(name)
    if hit:
        return hit
    m = mods.get(name)
    if isinstance(m, _ACT_MODULES) and current is not None:
        return current
    if isinstance(m, nn.Flatten | nn.Dropout):
        return COPY_ROW, "copies"
    return (f"other: {type(m).__name__}", "other") if m is not None else ("other: module", "other")


def _profile_torch_cuda(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module, *,
                        calls: int, warmup: int) -> Profile:
    """``torch.profiler`` (CPU + CUDA activities), kernel time per leaf-module range (untested here)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    remove = _module_ranges(backend.model)
    call_ms: list[float] = []
    try:
        for _ in range(warmup):
            backend.download(backend.run(backend.upload(host)))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(calls):
                with CallClock("wall") as cc:
                    x = backend.upload(host)
                    with record_function(_FORWARD):
                        y = backend.run(x)
                        torch.cuda.synchronize()
                    backend.download(y)
                call_ms.append(cc.ms)
    finally:
        remove()
    forwards = sorted((e for e in prof.events() if e.name == _FORWARD), key=lambda e: e.time_range.start)
    out = []
    for ev, c_ms in zip(forwards, call_ms, strict=False):
        rows, kinds = map_torch_forward(list(ev.cpu_children), rowmap, model, True)
        out.append(CallProfile(rows=rows, kinds=kinds, inside_ms=sum(rows.values()), call_ms=c_ms))
    return Profile.of(out, "torch.profiler (CUDA kernel time per module range)")


# --- TensorRT --------------------------------------------------------------------------------


def profile_tensorrt(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module, *,
                     calls: int, warmup: int, clock: str, onnx_path: Path | None = None) -> Profile:
    """TensorRT's per-layer ``IProfiler`` on the backend's engine (CUDA; untested without one).

    ``report_layer_time(layer_name, ms)`` is called once per layer after each synchronised
    inference; a fused layer's name joins the ONNX node names with ``" + "``.
    """
    import onnx
    import tensorrt as trt

    class LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.calls: list[list[tuple[str, float]]] = [[]]

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.calls[-1].append((layer_name, ms))

    runner = backend.runner
    context = getattr(runner, "context", None)
    if context is None:
        raise RuntimeError("the TensorRT runner exposes no execution context to attach a profiler to")
    prof = LayerTimes()
    context.profiler = prof
    modules = {n for n, _ in model.named_modules()}
    exported = OnnxMapper(onnx.load(str(onnx_path), load_external_data=False).graph, modules) \
        if onnx_path is not None and Path(onnx_path).is_file() else None
    tick = CLOCKS[clock]
    call_ms = []
    for i in range(warmup + calls):
        t0 = tick()
        backend.download(backend.run(backend.upload(host)))
        torch.cuda.synchronize()
        if i >= warmup:
            call_ms.append((tick() - t0) / 1e6)
        prof.calls.append([])
    out = []
    for layers, c_ms in zip(prof.calls[warmup:warmup + calls], call_ms, strict=False):
        rows: dict[str, float] = {}
        kinds: dict[str, str] = {}
        for layer, ms in layers:
            hit = None
            for part in layer.split(" + "):
                if exported is not None:
                    module = exported.module(part.strip())
                    hit = rowmap.row_of(module) if module else None
                if hit:
                    break
            _add(rows, kinds, *(hit or op_row(layer.split(" ")[0])), ms)
        out.append(CallProfile(rows=rows, kinds=kinds, inside_ms=sum(rows.values()), call_ms=c_ms))
    context.profiler = None
    return Profile.of(out, "TensorRT IProfiler (report_layer_time)")


def explain_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot be explained here (None: it can)."""
    if backend == "compile":
        return ("torch.compile fuses across modules, so Inductor's kernels have no per-module time; "
                "explain the eager model (--backend torch) or the ONNX export (--backend ort)")
    if backend not in EXPLAIN_BACKENDS:
        return f"no per-layer profiler for backend {backend!r} (explain: {', '.join(EXPLAIN_BACKENDS)})"
    return None


@dataclass
class Calibration:
    """What the profiler and the call cost on an (almost) empty model of the same input."""

    per_call_ms: float  # one unprofiled call: binding, executor start, input/output handling
    per_event_ms: float  # what one profiled event adds to its own duration (a no-op's event)
    how: str
    hook_ms: float = 0.0  # torch: the timing hooks' cost outside a module's interval
    gap_ms: float = 0.0  # ort: the profiled executor's time per node between node events


def _median_calls(fn: Callable[[], Any], clock: str, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(calls):
        with CallClock(clock) as cc:
            fn()
        ms.append(cc.ms)
    return float(np.median(ms))


def calibrate_ort(backend: Backend, host: torch.Tensor, *, clock: str, workdir: Path, calls: int = 50) -> Calibration:
    """An ONNX model ``X -> Shape -> Identity x32`` on the same input, in sessions set up as the
    backend's: its optimized (Identity-free) unprofiled call is the per-call overhead; the median
    profiled duration of its Identity nodes (no work) is the profiler's cost inside an event; the
    profiled executor time between events, less the unprofiled chain's cost per node, is the
    profiler's cost between events."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    workdir.mkdir(parents=True, exist_ok=True)
    n = 32
    dims = ["batch", *host.shape[1:]]
    nodes = [helper.make_node("Shape", ["x"], ["s0"], name="shape")]
    nodes += [helper.make_node("Identity", [f"s{i}"], [f"s{i + 1}"], name=f"id{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "calibration",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(f"s{n}", TensorProto.INT64, [4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = min(proto.ir_version, 10)
    path = workdir / "calibration.onnx"
    onnx.save(proto, str(path))
    x = host.contiguous().numpy()
    sess = ort.InferenceSession(str(path), sess_options=backend.session_options(), providers=["CPUExecutionProvider"])
    per_call = _median_calls(lambda: sess.run(None, {"x": x}), clock, calls, 5)
    so = backend.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Identity nodes
    chain = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    per_node = max(0.0, (_median_calls(lambda: chain.run(None, {"x": x}), clock, calls, 5) - per_call) / n)
    so = backend.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "calibration-profile")
    prof = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        prof.run(None, {"x": x})
    trace = Path(prof.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    durs = [e["dur"] / 1000.0 for e in events
            if e.get("cat") == "Node" and str(e.get("name", "")).startswith("id")
            and str(e.get("name", "")).endswith("_kernel_time")]
    node_sum = sum(e["dur"] for e in events if e.get("cat") == "Node"
                   and str(e.get("name", "")).endswith("_kernel_time")) / 1000.0
    run_ms = [e["dur"] / 1000.0 for e in events if e.get("name") == "model_run"]
    # the profiled executor's time per node outside the nodes' own durations, less what an
    # unprofiled node costs the executor (measured on the same chain without the profiler)
    gap = (sum(run_ms) - node_sum) / max(1, len(run_ms)) / (n + 1) if run_ms else 0.0
    gap = max(0.0, gap - per_node)
    return Calibration(per_call_ms=per_call, per_event_ms=float(np.median(durs)) if durs else 0.0,
                       how="ONNX model X -> Shape -> 32 Identity, same input and session options",
                       gap_ms=gap)


def calibrate_torch(backend: Backend, host: torch.Tensor, *, clock: str, calls: int = 50) -> Calibration:
    """``nn.Identity`` models on the same input. One unprofiled call (upload, inference mode,
    module call, download) is the per-call overhead; 16 Identity modules under the timing hooks
    give the hooks' cost inside a module's interval (its recorded time: no work) and outside it
    (the hooked forward's extra time beyond that)."""
    one = nn.Identity()

    def call() -> None:
        x = backend.upload(host)
        with torch.inference_mode():
            y = one(x)
        backend.download(y)

    per_call = _median_calls(call, clock, calls, 5)
    n = 16
    chain = nn.Sequential(*[nn.Identity() for _ in range(n)]).to(backend.device)
    x = backend.upload(host)

    def fwd() -> None:
        with torch.inference_mode():
            chain(x)

    bare = _median_calls(fwd, clock, calls, 5)
    records, remove = _module_clock(chain, clock)
    try:
        hooked = _median_calls(fwd, clock, calls, 5)
        records.clear()
        for _ in range(calls):
            fwd()
    finally:
        remove()
    inside = float(np.median([ns / 1e6 for _, ns in records])) if records else 0.0
    outside = max(0.0, (hooked - bare) / n - inside)
    return Calibration(per_call_ms=per_call, per_event_ms=inside, hook_ms=outside,
                       how="nn.Identity models, same input, same timing hooks")


def calibrate(backend: Backend, host: torch.Tensor, *, clock: str, workdir: Path) -> Calibration:
    if backend.name == "ort" and backend.device == "cpu":
        return calibrate_ort(backend, host, clock=clock, workdir=workdir)
    if backend.name == "torch":
        return calibrate_torch(backend, host, clock=clock)
    return Calibration(per_call_ms=0.0, per_event_ms=0.0, how="not calibrated on this backend")


def profile_backend(backend: Backend, host: torch.Tensor, rowmap: RowMap, model: nn.Module, *,
                    calls: int, warmup: int, workdir: Path, clock: str, event_ms: float = 0.0,
                    hook_ms: float = 0.0, gap_ms: float = 0.0, onnx_path: Path | None = None) -> Profile:
    if backend.name == "ort":
        return profile_ort(backend, host, rowmap, model, calls=calls, warmup=warmup, workdir=workdir,
                           clock=clock, event_ms=event_ms, gap_ms=gap_ms)
    if backend.name == "torch":
        return profile_torch(backend, host, rowmap, model, calls=calls, warmup=warmup, clock=clock,
                             event_ms=event_ms, hook_ms=hook_ms)
    if backend.name == "tensorrt":
        return profile_tensorrt(backend, host, rowmap, model, calls=calls, warmup=warmup, clock=clock,
                                onnx_path=onnx_path)
    raise ValueError(explain_unavailable(backend.name) or f"backend {backend.name}")


# ---------------------------------------------------------------------------------------------
# the table


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and a > 0 else None


def build_rows(profiles: Mapping[str, Profile], measured: Mapping[str, float],
               flops: Mapping[str, Mapping[str, int]], totals_flops: Mapping[str, int],
               widths: Mapping[str, Mapping[str, int]], node_order: list[str],
               per_call_ms: float = 0.0) -> list[dict[str, Any]]:
    """One row per node / named part: FLOPs and time base/slim, reductions, efficiency, shares.

    Model rows are the profiler's medians (less the calibrated cost of each profiled event);
    ``per-call overhead`` is the calibrated cost of one call of an empty model on the backend
    (binding, executor, input/output), the same for base and slim; the ``gap`` row is the
    measured end-to-end p50 minus all of that, so each column sums to the measured latency.
    The profiling session's own executor time is not a row: it is mostly the profiler's.
    """
    parts: dict[str, dict[str, float]] = defaultdict(lambda: {"base": 0.0, "slim": 0.0})
    kinds: dict[str, str] = {}
    for v, p in profiles.items():
        k = drift(p, measured[v])
        for r, ms in p.rows.items():
            parts[r][v] += k * ms
            kinds.setdefault(r, p.kinds.get(r, "other"))
        parts[CALL_ROW][v] = k * per_call_ms
        parts[GAP_ROW][v] = measured[v] - sum(parts[r][v] for r in parts if r != GAP_ROW)
    kinds.update({CALL_ROW: "per-call overhead", GAP_ROW: "gap"})
    for v in ("base", "slim"):
        for r in flops[v]:
            parts[r]  # a row with FLOPs but no profiled time (folded away) still shows
            kinds.setdefault(r, "node" if r in node_order else "other")
    total_red = totals_flops["base"] / totals_flops["slim"]
    order = {n: i for i, n in enumerate(node_order)}

    def sort_key(r: str) -> tuple:
        k = kinds.get(r, "other")
        return (KINDS.index(k) if k in KINDS else len(KINDS), order.get(r, 1 << 30), r)

    rows = []
    for r in sorted(parts, key=sort_key):
        tb, ts = parts[r]["base"], parts[r]["slim"]
        fb, fs = flops["base"].get(r, 0), flops["slim"].get(r, 0)
        t_red, f_red = _ratio(tb, ts), _ratio(fb, fs)
        rows.append({
            "row": r, "kind": kinds.get(r, "other"),
            "channels_base": widths["base"].get(r), "channels_slim": widths["slim"].get(r),
            "flops_base": int(fb), "flops_slim": int(fs), "time_base_ms": tb, "time_slim_ms": ts,
            "flops_reduction": f_red, "time_reduction": t_red,
            "efficiency": t_red / f_red if t_red and f_red else None,
            "share_base": tb / measured["base"], "share_slim": ts / measured["slim"],
            # slim time beyond what this row would take had it shrunk like the whole model's FLOPs
            "excess_ms": ts - tb / total_red,
            "saved_ms": tb - ts,
        })
    for row in rows:
        saved = measured["base"] - measured["slim"]
        row["speedup_share"] = row["saved_ms"] / saved if abs(saved) > 1e-6 * measured["base"] else None
    return rows


def drift(p: Profile, measured_ms: float) -> float:
    """Load drift between the paired measurement and the profiling pass: the measured p50 over
    the median unprofiled call interleaved with the profiled ones (1 when none were made).
    On a shared machine the same call costs more CPU time when other jobs share the core's
    caches; profiled rows are put on the paired measurement's scale by this factor."""
    if not math.isfinite(p.plain_ms) or p.plain_ms <= 0:
        return 1.0
    return measured_ms / p.plain_ms


def reconcile(profiles: Mapping[str, Profile], measured: Mapping[str, float], tolerance: float,
              per_call_ms: float = 0.0) -> dict[str, Any]:
    """Profiled total (model rows + calibrated per-call overhead) against the unprofiled calls
    interleaved with the profiled ones (same moment, same load): ``gap_fraction`` is
    (unprofiled - profiled) / unprofiled, medians; ``per_call_gap_fraction`` one minus the median
    over calls of each profiled call / the unprofiled one before it; the drift to the paired p50
    is beside them."""
    out: dict[str, Any] = {"tolerance": tolerance}
    ok = True
    for v, p in profiles.items():
        profiled = sum(p.rows.values()) + per_call_ms
        plain = p.plain_ms if math.isfinite(p.plain_ms) else measured[v]
        gap = plain - profiled
        rel = gap / plain
        ok &= abs(rel) <= tolerance
        # each profiled call against the unprofiled call made just before it (load that comes and
        # goes over the pass hits both alike): reported beside it
        ratios = [(t + per_call_ms) / u for t, u in p.pairs if math.isfinite(u) and u > 0]
        out[v] = {"measured_p50_ms": measured[v], "unprofiled_ms": plain, "drift": drift(p, measured[v]),
                  "profiled_ms": profiled, "model_rows_ms": sum(p.rows.values()),
                  "gap_ms": gap, "gap_fraction": rel, "profiled_calls": p.calls,
                  "per_call_gap_fraction": 1.0 - float(np.median(ratios)) if ratios else None}
    out["reconciled"] = bool(ok)
    return out


# ---------------------------------------------------------------------------------------------
# diagnosis


def preferred_multiple(backend: str, device: str, precision: str) -> tuple[int, str]:
    """The channel multiple the backend's kernels block by, and why."""
    if device == "cuda":
        if precision == "int8":
            return 32, "int8 tensor-core tiles (32 channels)"
        if precision in ("fp16", "bf16") or backend == "tensorrt":
            return 8, "fp16/bf16 tensor cores take channels in multiples of 8"
        return 4, "fp32/TF32 kernels vectorise 4 channels"
    flags = ""
    with contextlib.suppress(OSError):  # not Linux: no AVX-512 claim
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    simd = 16 if " avx512f" in flags else 8
    what = "AVX-512" if simd == 16 else "AVX2"
    if backend == "ort":
        return simd, f"ONNX Runtime's NCHWc blocked convolutions use blocks of {simd} channels ({what})"
    return simd, f"{what} fp32 vectors hold {simd} channels (oneDNN blocked layouts)"


def round_width(k: int, multiple: int, channels: int) -> int:
    """``k`` to the nearest multiple (at least one multiple, at most the base width)."""
    r = max(multiple, int(round(k / multiple)) * multiple)
    return min(r, channels)


def diagnose(rows: list[dict[str, Any]], measured: Mapping[str, float], flops_total: Mapping[str, int],
             *, multiple: int, multiple_why: str, widths: Mapping[str, Mapping[str, int]],
             prunable: Mapping[str, bool], top: int = 5) -> dict[str, Any]:
    """What to act on, computed from the table."""
    flops_red = flops_total["base"] / flops_total["slim"]
    speedup = measured["base"] / measured["slim"]
    nodes = [r for r in rows if r["kind"] == "node"]
    # 1. layers that lost FLOPs but kept time
    lagging = [r for r in nodes if (r["flops_reduction"] or 1) >= 1.25 and r["efficiency"] is not None
               and r["efficiency"] < 0.7]
    lagging.sort(key=lambda r: r["time_slim_ms"] - r["time_base_ms"] / r["flops_reduction"], reverse=True)
    lag = [{"row": r["row"], "channels": f"{r['channels_base']} -> {r['channels_slim']}",
            "flops_reduction": r["flops_reduction"], "time_reduction": r["time_reduction"],
            "efficiency": r["efficiency"],
            "missed_ms": r["time_slim_ms"] - r["time_base_ms"] / r["flops_reduction"]} for r in lagging[:top]]
    # 2. layout conversions
    layout = {v: sum(r[f"time_{v}_ms"] for r in rows if r["kind"] == "layout") for v in ("base", "slim")}
    # 3. widths off the preferred multiple
    odd = []
    for name, k in widths["slim"].items():
        if not prunable.get(name, True) or k % multiple == 0:
            continue
        full = widths["base"].get(name, k)
        odd.append({"node": name, "channels": k, "base_channels": full,
                    "rounded": round_width(k, multiple, full)})
    # 4. what no pruning removes
    by_kind: dict[str, float] = defaultdict(float)
    for r in rows:
        by_kind[r["kind"]] += r["time_slim_ms"]
    fixed = sum(by_kind[k] for k in OVERHEAD_KINDS)
    unpruned_rows = [r for r in rows if (r["kind"] == "node" and r["channels_base"] == r["channels_slim"])
                     or r["kind"] == "classifier"]
    unpruned = sum(r["time_slim_ms"] for r in unpruned_rows)
    excess = sorted(rows, key=lambda r: r["excess_ms"], reverse=True)
    ideal = measured["base"] / flops_red
    return {
        "flops_reduction": flops_red, "speedup": speedup, "efficiency": speedup / flops_red,
        "ideal_slim_ms": ideal, "missing_ms": measured["slim"] - ideal,
        "where_missing": [{"row": r["row"], "kind": r["kind"], "excess_ms": r["excess_ms"],
                           "share": r["excess_ms"] / (measured["slim"] - ideal) if measured["slim"] > ideal else None}
                          for r in excess[:top] if r["excess_ms"] > 0],
        "lagging_layers": lag,
        "layout_ms": layout, "layout_share_slim": layout["slim"] / measured["slim"],
        "preferred_multiple": multiple, "preferred_why": multiple_why, "odd_widths": odd,
        "fixed_overhead_ms": fixed, "fixed_share_slim": fixed / measured["slim"],
        "ceiling_speedup": measured["base"] / fixed if fixed > 0 else None,
        "unpruned_ms": unpruned, "unpruned_rows": [r["row"] for r in unpruned_rows],
        "ceiling_speedup_with_unpruned": measured["base"] / (fixed + unpruned) if fixed + unpruned > 0 else None,
    }


def rounded_plan(base_nodes: list[Node], slim_kept: Mapping[str, list[int]], rounded: Mapping[str, int]) -> dict[str, list[int]]:
    """The slim plan with the nodes in ``rounded`` at their new width (grow: add the lowest
    channels the slim dropped; shrink: drop its last kept ones). Timing only: weights are the base's."""
    plan = {k: list(v) for k, v in slim_kept.items()}
    for n in base_nodes:
        if n.name not in rounded:
            continue
        kept = plan.get(n.name, list(range(n.channels)))
        k = rounded[n.name]
        if k >= len(kept):
            extra = [c for c in range(n.channels) if c not in set(kept)][: k - len(kept)]
            kept = sorted([*kept, *extra])
        else:
            kept = kept[:k]
        plan[n.name] = kept
    return plan


def now_s() -> float:
    return time.perf_counter()


def finite(x: Any) -> Any:
    """JSON-safe: non-finite floats become None (nothing non-finite is saved)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def artifact_from(model: nn.Module, plan: Any, name: str, workdir: Path, path: Path | None = None) -> Artifact:
    workdir.mkdir(parents=True, exist_ok=True)
    return Artifact(name=name, path=path or workdir, model=model.eval(), plan=plan, workdir=workdir)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class ExplainConfig:
    """``bench explain`` options: one backend, device, precision and batch."""

    backend: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    batch: int = 1
    threads: int = 1
    clock: str = "cpu"  # the paired end-to-end timing's clock (docs/bench.md)
    calls: int = 20  # profiled calls per variant (medians per row)
    warmup: int = 3
    timing: Any = None  # bench.timing.TimingConfig of the paired measurement
    tolerance: float = 0.15  # |measured - profiled| / measured that still reconciles
    probe: str = "combined"  # none | combined: time the rounded widths against the slim
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        reason = explain_unavailable(self.backend)
        if reason:
            raise ValueError(f"--backend {self.backend}: {reason}")
        if self.batch < 1 or self.calls < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("--batch, --calls and --threads must be >= 1, --profile-warmup >= 0")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--tolerance {self.tolerance}: expected a fraction in (0, 1)")
        if self.probe not in ("none", "combined"):
            raise ValueError(f"--probe {self.probe!r}: expected none or combined")
        if self.clock == "cpu" and (self.threads != 1 or self.device != "cpu"):
            raise ValueError("the cpu clock needs --threads 1 and --device cpu (use --clock wall)")


def _bench_config(cfg: ExplainConfig) -> Any:
    from bench.sweep import BenchConfig
    from bench.timing import TimingConfig

    timing = cfg.timing or TimingConfig(warmup_s=0.3, warmup_iters=5, min_time_s=1.5, rounds=10,
                                        min_samples=40, min_per_round=2, clock=cfg.clock)
    return BenchConfig(backends=(cfg.backend,), devices=(cfg.device,), precisions=(cfg.precision,),
                       batches=(cfg.batch,), threads=cfg.threads, timing=timing, seed=cfg.seed,
                       model_name=cfg.name)


def probe_rounding(sh: Any, pair: Mapping[str, Backend], nodes: list[Node], rounded: Mapping[str, int],
                   cfg: ExplainConfig, workdir: Path) -> dict[str, Any]:
    """Time the slim with ``rounded`` widths against the slim itself (paired rounds)."""
    from dataclasses import replace

    from bench.latency.probe import CHECK
    from bench.stats import geometric_mean, round_ratios
    from bench.sweep import host_batch
    from bench.timing import Timer, measure_pair
    from deploy_prune.allocation import cut

    base, slim = sh.artifacts["base"], sh.artifacts["slim"]
    example = base.plan.example()
    kept = slim.plan.kept or {}
    plan = rounded_plan(nodes, kept, rounded)
    model = cut(base.model, plan, example).eval()
    flops = count(model, example).flops
    art = artifact_from(model, replace(slim.plan, kept=plan, info={}), "rounded", workdir / "rounded")
    from bench.backends import BACKENDS

    backend = BACKENDS.get(cfg.backend)(device=cfg.device, precision=cfg.precision, options=sh.cfg.options())
    backend.prepare(art, host_batch(art, 2, cfg.seed))
    try:
        host = host_batch(base, cfg.batch, cfg.seed)
        timing = replace(CHECK, clock=cfg.clock)
        a, b = measure_pair(Timer(pair["slim"], host, clock=cfg.clock), Timer(backend, host, clock=cfg.clock), timing)
        gain = float(geometric_mean(round_ratios(a.e2e_ms, b.e2e_ms)))
        slim_ms = float(np.median(a.flat()))
    finally:
        backend.close()
    return {"widths": dict(rounded), "speedup_over_slim": gain, "slim_ms": slim_ms,
            "rounded_ms": slim_ms / gain, "flops": flops, "flops_slim": sh.flops["slim"],
            "flops_reduction": sh.flops["base"] / flops}


def explain(base_dir: str | Path, slim_dir: str | Path, out: str | Path, cfg: ExplainConfig, *,
            artifacts: tuple[Artifact, Artifact] | None = None, command: str | None = None) -> dict[str, Any]:
    """Measure, profile, map, tabulate and diagnose one base/slim pair; write ``out``."""
    from bench import env
    from bench.sweep import (
        host_batch,
        load_artifact,
        make_shared,
        measure_batch,
        pinned_threads,
        prepare_pair,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bcfg = _bench_config(cfg)
    with pinned_threads(cfg.threads):
        environment = env.collect(threads=cfg.threads)
        if artifacts is None:
            arts = (load_artifact("base", base_dir, out), load_artifact("slim", slim_dir, out))
            for a in arts:
                _seed_onnx(a)
        else:
            arts = artifacts
        sh = make_shared(*arts, bcfg, environment)
        reason = _unavailable(cfg, bcfg)
        if reason:
            raise ValueError(f"{cfg.backend} on {cfg.device}/{cfg.precision} cannot run here: {reason}")
        base, slim = sh.artifacts["base"], sh.artifacts["slim"]
        example = base.plan.example()
        nodes = discover(base.model, example)
        rowmap = build_rowmap(base.model, example, nodes)
        widths = {"base": node_widths(base.model, nodes), "slim": node_widths(slim.model, nodes)}
        flops, totals = {}, {}
        for v, a in (("base", base), ("slim", slim)):
            flops[v], totals[v] = row_flops(a.model, example, rowmap)
        pair = prepare_pair(sh, cfg.backend, cfg.device, cfg.precision)
        try:
            t0 = now_s()
            measured_rows = measure_batch(sh, pair, cfg.batch)
            log.info("paired timing: %.1fs", now_s() - t0)
            measured = {r["variant"]: float(r["p50_ms"]) for r in measured_rows}
            slim_row = next(r for r in measured_rows if r["variant"] == "slim")
            host = host_batch(base, cfg.batch, cfg.seed)
            calib = calibrate(pair["base"], host, clock=cfg.clock, workdir=out / "profile")
            profiles = {}
            for v in ("base", "slim"):
                t0 = now_s()
                profiles[v] = profile_backend(pair[v], host, rowmap, sh.artifacts[v].model, calls=cfg.calls,
                                              warmup=cfg.warmup, workdir=out / "profile" / v, clock=cfg.clock,
                                              event_ms=calib.per_event_ms, hook_ms=calib.hook_ms,
                                              gap_ms=calib.gap_ms,
                                              onnx_path=sh.artifacts[v]._cache.get("onnx"))
                log.info("profiled %s: %d calls in %.1fs", v, profiles[v].calls, now_s() - t0)
            rows = build_rows(profiles, measured, flops, totals, widths, [n.name for n in nodes],
                              per_call_ms=calib.per_call_ms)
            multiple, why = preferred_multiple(cfg.backend, cfg.device, cfg.precision)
            diagnosis = diagnose(rows, measured, totals, multiple=multiple, multiple_why=why, widths=widths,
                                 prunable={n.name: n.prunable for n in nodes})
            if cfg.probe == "combined" and diagnosis["odd_widths"]:
                rounded = {o["node"]: o["rounded"] for o in diagnosis["odd_widths"] if o["rounded"] != o["channels"]}
                if rounded:
                    try:
                        probe = probe_rounding(sh, pair, nodes, rounded, cfg, out / "artifacts")
                        probe["speedup_over_base"] = slim_row["speedup"] * probe["speedup_over_slim"]
                        diagnosis["rounding_probe"] = probe
                    except Exception as e:  # an export or timing failure must not lose the table
                        log.warning("rounding probe failed: %s", e)
                        diagnosis["rounding_probe"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            for b in pair.values():
                b.close()
    result = {
        "format": "deploy-prune/explain@1", "command": command,
        "model": sh.model, "backend": cfg.backend, "device": cfg.device, "precision": cfg.precision,
        "batch": cfg.batch, "threads": cfg.threads, "clock": cfg.clock,
        "base_dir": str(base.path), "slim_dir": str(slim.path),
        "measured": {"base_p50_ms": measured["base"], "slim_p50_ms": measured["slim"],
                     "speedup": slim_row["speedup"], "speedup_ci": [slim_row["speedup_ci_low"], slim_row["speedup_ci_high"]],
                     "flops_reduction": sh.flops_reduction, "efficiency": slim_row["efficiency"],
                     "samples": slim_row["samples"]},
        "profiler": {v: {"source": p.source, "calls": p.calls, "clean_calls": p.clean_calls,
                         "profiled_run_ms": p.inside_ms,
                         "profiled_call_ms": p.call_ms}
                     for v, p in profiles.items()},
        "calibration": {"per_call_ms": calib.per_call_ms, "per_event_ms": calib.per_event_ms,
                        "hook_ms": calib.hook_ms, "gap_ms": calib.gap_ms, "how": calib.how},
        "reconciliation": reconcile(profiles, measured, cfg.tolerance, calib.per_call_ms),
        "rows": rows, "diagnosis": diagnosis,
        "environment": {k: environment.get(k) for k in ("cpu_model", "load_avg_1m", "threads", "versions", "gpu_name")},
    }
    from bench.explain_report import write_outputs

    write_outputs(finite(result), out)
    return result


def _unavailable(cfg: ExplainConfig, bcfg: Any) -> str | None:
    from bench.backends import BACKENDS

    return BACKENDS.get(cfg.backend).unavailable(cfg.device, cfg.precision, bcfg.options())


def _seed_onnx(a: Artifact) -> None:
    """Reuse ``DIR/model.onnx`` (the suite's export) when its metadata names this plan."""
    from bench.backends.onnx_cache import seed_onnx
    from export.to_onnx import read_metadata

    path = a.path / "model.onnx"
    if not path.is_file():
        return
    try:
        meta = read_metadata(path)
    except Exception:
        return
    if meta.get("plan_sha256") == a.plan.digest():
        seed_onnx(a, path)
