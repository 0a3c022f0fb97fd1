"""Export stage: ONNX (parity, dynamic batch, metadata, BN folding), AOTInductor, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export
from deploy_prune.artifacts import ModelPlan, load_model_dir, save_model_dir
from deploy_prune.cli import main
from deploy_prune.flops import count
from deploy_prune.models import MODELS, build_model
from deploy_prune.nodes import discover
from deploy_prune.surgery import apply_plan
from export import to_onnx
from export.calibration import RANDOM_SOURCE, calibration_batches, calibration_for, rebatch
from export.errors import BackendUnavailableError, ParityError
from export.fold import fold_batchnorm
from export.formats import COMMON_OPTIONS, FORMATS, export_model_dir
from export.parity import DEFAULT_TOLERANCE, batches_in_range, check_close
from export.to_aoti import export_aoti, load_aoti
from export.to_onnx import export_onnx, parity_tolerance, read_metadata, verify_onnx
from export.to_trt import (
    PRECISIONS,
    build_engine,
    onnx_precision_for,
    onnx_typing,
    plan_build,
)

IMAGENET_ARCHS = {"vgg16", "vgg16_bn", "resnet50"}  # torchvision models, tested at 64x64


def side(arch: str) -> int:
    return 64 if arch in IMAGENET_ARCHS else 32


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def make_model(arch: str, *, seed: int = 0, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model(arch, num_classes=10, in_channels=in_channels), seed).eval()


def random_slim(model: nn.Module, example: torch.Tensor, *, keep: float = 0.6, seed: int = 0) -> dict:
    """Cut every prunable node to an odd-ish random subset of its channels."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for node in discover(model, example):
        if node.prunable:
            k = max(1, int(node.channels * keep) - 1)
            plan[node.name] = sorted(torch.randperm(node.channels, generator=g)[:k].tolist())
    apply_plan(model, plan, example)
    return plan


def make_model_dir(root: Path, arch: str = "small_vgg", *, slim: bool = False, name: str = "model",
                   info: dict | None = None, in_channels: int = 3, size: int | None = None) -> Path:
    size = size or side(arch)
    model = make_model(arch, in_channels=in_channels)
    kept = random_slim(model, torch.zeros(1, in_channels, size, size)) if slim else None
    plan = ModelPlan(arch, 10, in_channels, size, kept=kept, info=dict(info or {}))
    return save_model_dir(model.eval(), plan, root / name)


def bn_nodes(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def vgg_onnx(tmp_path_factory) -> tuple[nn.Module, Path]:
    """One verified small_vgg export shared by the read-only tests below."""
    model = make_model("small_vgg")
    out = tmp_path_factory.mktemp("onnx") / "small_vgg.onnx"
    export_onnx(model, torch.zeros(2, 3, 32, 32), out, metadata={"note": "hello", "nested": {"a": [1, 2]}})
    return model, out


# --- BatchNorm folding --------------------------------------------------------------------------

def test_fold_batchnorm_removes_bn_and_keeps_outputs():
    model = make_model("resnet20")
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


# --- ONNX parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.slow) if a in IMAGENET_ARCHS else a for a in MODELS.names()])
def test_onnx_parity_every_registered_model(arch, tmp_path):
    model = make_model(arch)
    out = export_onnx(model, torch.zeros(2, 3, side(arch), side(arch)), tmp_path / f"{arch}.onnx",
                      verify=False)
    diffs = verify_onnx(out, model)
    assert set(diffs) == {1, 7}
    assert max(diffs.values()) < 1e-3
    assert bn_nodes(out) == 0


def test_onnx_has_no_batchnorm_node(vgg_onnx):
    _, path = vgg_onnx
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_dynamic_batch_runs_two_batch_sizes_through_one_file(vgg_onnx):
    model, path = vgg_onnx
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 7):
        x = torch.randn(b, 3, 32, 32)
        (y,) = session.run(None, {"input": x.numpy()})
        assert y.shape == (b, 10)
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-3, atol=1e-4)


def test_static_batch_is_fixed(tmp_path):
    model = make_model("small_vgg")
    out = export_onnx(model, torch.zeros(3, 3, 32, 32), tmp_path / "static.onnx", dynamic_batch=False)
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert set(verify_onnx(out, model)) == {3}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"input": np.zeros((7, 3, 32, 32), np.float32)})


@pytest.mark.parametrize("opset", [17, pytest.param(20, marks=pytest.mark.slow)])
def test_opset_is_selectable(opset, tmp_path):
    out = export_onnx(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "m.onnx", opset=opset)
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == opset
    assert read_metadata(out)["opset"] == opset


def test_opset_the_exporter_cannot_reach_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="opset 11"):
        export_onnx(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "m.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_parity_and_metadata(tmp_path):
    pytest.importorskip("onnxslim", reason="export --simplify needs onnxslim (pip install onnxslim)")
    model = make_model("small_vgg")
    out = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path / "slim.onnx", simplify=True,
                      metadata={"k": 1})
    assert read_metadata(out)["k"] == 1
    assert bn_nodes(out) == 0
    assert max(verify_onnx(out, model).values()) < 1e-3


# --- metadata ---------------------------------------------------------------------------------------

def test_custom_metadata_round_trips(vgg_onnx):
    meta = read_metadata(vgg_onnx[1])
    assert meta["note"] == "hello" and meta["nested"] == {"a": [1, 2]}


# --- parity failures and reliability ---------------------------------------------------------------

def corrupting_fold(model: nn.Module) -> nn.Module:
    """A BN fold that gets one weight wrong: what a real folding bug would look like."""
    folded = fold_batchnorm(model)
    with torch.no_grad():
        next(p for p in folded.parameters() if p.dim() == 4)[0].mul_(3.0)
    return folded


def test_parity_failure_fails_the_export_and_keeps_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(to_onnx, "fold_batchnorm", corrupting_fold)
    out_dir = tmp_path / "out"
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_onnx(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), out_dir / "bad.onnx")
    assert list(out_dir.iterdir()) == []  # neither the file nor its temporary


def test_no_verify_writes_even_a_wrong_file(tmp_path, monkeypatch):
    monkeypatch.setattr(to_onnx, "fold_batchnorm", corrupting_fold)
    model = make_model("small_vgg")
    out = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path / "unverified.onnx", verify=False)
    with pytest.raises(ParityError):
        verify_onnx(out, model)


def test_verify_against_a_different_model_raises(vgg_onnx):
    with pytest.raises(ParityError, match="batch 1"):
        verify_onnx(vgg_onnx[1], make_model("small_vgg", seed=1))


def test_check_close_uses_the_allclose_rule():
    ref = torch.tensor([1.0, 100.0])
    diff = check_close(ref + torch.tensor([5e-4, 5e-2]), ref, rtol=1e-3, atol=1e-3, what="t")
    assert diff == pytest.approx(5e-2, rel=1e-3)
    with pytest.raises(ParityError):
        check_close(ref + torch.tensor([3e-3, 0.0]), ref, rtol=1e-3, atol=1e-3, what="t")
    with pytest.raises(ParityError, match="shape"):
        check_close(ref[:1], ref, rtol=1, atol=1, what="t")
    assert batches_in_range(1, 128) == (1, 7) and batches_in_range(2, 4) == (2, 4)


def test_existing_output_needs_force(vgg_onnx, tmp_path):
    model, _ = vgg_onnx
    out = tmp_path / "m.onnx"
    out.write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(model, torch.zeros(2, 3, 32, 32), out)
    assert out.read_text() == "old"
    export_onnx(model, torch.zeros(2, 3, 32, 32), out, force=True, verify=False)
    assert onnx.load(str(out)).graph.node


def test_garbage_onnx_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not protobuf \xff" * 10)
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        verify_onnx(garbage, make_model("small_vgg"))
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_metadata(garbage)
    # the TensorRT builder validates the file before it even imports tensorrt
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        build_engine(garbage, tmp_path / "g.engine")
    with pytest.raises(FileNotFoundError):
        verify_onnx(tmp_path / "missing.onnx", make_model("small_vgg"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]


def test_bad_tensorrt_settings_are_rejected_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp8")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", min_batch=8, opt_batch=4)


def test_tensorrt_missing_is_a_clear_error(vgg_onnx, tmp_path):
    try:
        export.to_trt.require_tensorrt()
    except BackendUnavailableError:
        pass
    else:
        pytest.skip("tensorrt and a CUDA GPU are both present; tests/test_export_trt.py covers them")
    with pytest.raises(BackendUnavailableError, match="tensorrt|CUDA GPU"):
        build_engine(vgg_onnx[1], tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []


# --- fp16 ONNX (what TensorRT 11 builds fp16 engines from) -------------------------------------------

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@pytest.fixture(scope="module")
def vgg_fp16_onnx(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A verified fp16 small_vgg export (fp32 IO, fp16 inside) shared by the tests below."""
    model = make_model("small_vgg")
    out = tmp_path_factory.mktemp("onnx16") / "small_vgg_fp16.onnx"
    export_onnx(model, torch.zeros(2, 3, 32, 32), out, precision="fp16")
    return model, out


def test_fp16_onnx_has_fp32_io_and_fp16_weights(vgg_fp16_onnx):
    _, path = vgg_fp16_onnx
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    floats = [i for i in graph.initializer if i.data_type in FLOAT_TYPES]
    assert floats and {i.data_type for i in floats} == {onnx.TensorProto.FLOAT16}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and "BatchNormalization" not in {n.op_type for n in graph.node}
    assert sum(n.op_type == "Cast" for n in graph.node) >= 2  # into fp16 after the input, back before the output


def test_fp16_onnx_metadata_records_the_precision(vgg_fp16_onnx, vgg_onnx):
    meta = read_metadata(vgg_fp16_onnx[1])
    assert meta["precision"] == "fp16" and meta["io_dtype"] == "float32"
    assert meta["input_shape"] == [3, 32, 32] and meta["dynamic_batch"] is True
    assert read_metadata(vgg_onnx[1])["precision"] == "fp32"  # fp32 exports say so too


def test_fp16_onnx_runs_in_onnx_runtime_cpu_at_fp16_tolerance(vgg_fp16_onnx):
    model, path = vgg_fp16_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 32, 32)
    (y,) = session.run(None, {"input": x.numpy()})  # ORT inserts casts where it lacks fp16 kernels
    assert y.dtype == np.float32 and y.shape == (7, 10)
    diffs = verify_onnx(path, model)  # the fp16 tolerance comes from the file's metadata
    assert set(diffs) == {1, 7}
    assert 0 < max(diffs.values())  # really computed in half precision
    rtol, atol = parity_tolerance("fp16", model, (3, 32, 32), None, None)
    assert rtol == DEFAULT_TOLERANCE["fp16"][0] and atol >= DEFAULT_TOLERANCE["fp16"][1]
    assert parity_tolerance("fp32", model, (3, 32, 32), None, None) == (1e-3, 1e-4)
    with pytest.raises(ParityError):  # tight fp32 tolerances do not hold for an fp16 graph
        verify_onnx(path, model, rtol=0.0, atol=1e-7)


def scaling_fold(model: nn.Module) -> nn.Module:
    """A fold that triples the classifier's weights: a bug beyond fp16's (looser) tolerance."""
    folded = fold_batchnorm(model)
    with torch.no_grad():
        [p for p in folded.parameters() if p.dim() == 2][-1].mul_(3.0)
    return folded


def test_fp16_onnx_parity_failure_keeps_no_file(vgg_fp16_onnx, tmp_path, monkeypatch):
    with pytest.raises(ParityError, match="batch 1"):
        verify_onnx(vgg_fp16_onnx[1], make_model("small_vgg", seed=1))
    monkeypatch.setattr(to_onnx, "fold_batchnorm", scaling_fold)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_onnx(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "bad.onnx", precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_onnx_precisions_other_than_fp32_fp16_are_refused(tmp_path):
    for precision, route in (("bf16", "modelopt.onnx.autocast"), ("int8", "modelopt.onnx.quantization")):
        with pytest.raises(ValueError, match=route):
            export_onnx(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "m.onnx",
                        precision=precision)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_an_fp16_onnx(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path, "resnet20", slim=True)
    out = tmp_path / "slim_fp16.onnx"
    rc, stdout, _ = run_cli(capsys, model_dir, "--format", "onnx", "--out", out, "--precision", "fp16")
    assert rc == 0 and stdout.count("\n") == 1
    meta = read_metadata(out)
    assert meta["precision"] == "fp16" and meta["plan_sha256"]
    assert onnx_typing(onnx.load(str(out))) == ("fp16", False)
    model, _ = load_model_dir(model_dir)
    assert set(verify_onnx(out, model)) == {1, 7}


# --- TensorRT 10 (weak typing) vs 11 (strong typing): the build decision, no TensorRT needed ----------

def qdq_proto() -> onnx.ModelProto:
    """A tiny explicitly quantized graph: x -> QuantizeLinear -> DequantizeLinear -> Relu."""
    h, T = onnx.helper, onnx.TensorProto
    inits = [h.make_tensor("scale", T.FLOAT, [], [0.1]), h.make_tensor("zero", T.INT8, [], [0])]
    nodes = [h.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
             h.make_node("Relu", ["dq"], ["y"])]
    graph = h.make_graph(nodes, "qdq", [h.make_tensor_value_info("x", T.FLOAT, ["b", 3, 4, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["b", 3, 4, 4])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_onnx_typing_reads_float_type_and_qdq(vgg_onnx, vgg_fp16_onnx):
    assert onnx_typing(onnx.load(str(vgg_onnx[1]))) == ("fp32", False)
    assert onnx_typing(onnx.load(str(vgg_fp16_onnx[1]))) == ("fp16", False)
    assert onnx_typing(qdq_proto()) == ("fp32", True)
    mixed = onnx.load(str(vgg_onnx[1]))  # AutoCast-style: some fp32 layers kept, the rest fp16
    mixed.graph.initializer.append(onnx.helper.make_tensor("h", onnx.TensorProto.FLOAT16, [1], [1.0]))
    assert onnx_typing(mixed) == ("fp16", False)


def test_onnx_precision_for_an_engine():
    assert onnx_precision_for(10, "fp16") == "fp32"  # TensorRT 10 lowers an fp32 graph itself
    assert onnx_precision_for(11, "fp16") == "fp16" and onnx_precision_for(12, "fp16") == "fp16"
    assert {onnx_precision_for(11, p) for p in PRECISIONS if p != "fp16"} == {"fp32"}


WEAK_FLAGS = {"fp32": (), "tf32": ("TF32",), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
CASES = [(major, precision, onnx_float, qdq) for major in (10, 11, 12) for precision in PRECISIONS
         for onnx_float in ("fp32", "fp16", "bf16") for qdq in (False, True)]


@pytest.mark.parametrize(("major", "precision", "onnx_float", "qdq"), CASES)
def test_plan_build_every_case(major, precision, onnx_float, qdq):
    if major == 10:  # the TensorRT 10 path is unchanged whatever the graph holds
        plan = plan_build(major, precision, onnx_float, qdq)
        assert plan.typing == "weak" and not plan.strongly_typed
        assert plan.set_flags == WEAK_FLAGS[precision]
        assert plan.clear_flags == (("TF32",) if precision == "fp32" else ())
        assert plan.calibrate == (precision == "int8")
        return
    wanted = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(precision)
    ok = qdq if precision == "int8" else (not qdq and onnx_float == wanted)
    if not ok:
        with pytest.raises(ValueError, match=f"TensorRT {major}"):
            plan_build(major, precision, onnx_float, qdq)
        return
    plan = plan_build(major, precision, onnx_float, qdq)
    assert plan.typing == "strong" and plan.strongly_typed and not plan.calibrate
    assert not {"FP16", "BF16", "INT8"} & set(plan.set_flags + plan.clear_flags)  # removed in 11
    assert plan.set_flags == (("TF32",) if precision == "tf32" else ())
    assert plan.clear_flags == (("TF32",) if precision == "fp32" else ())


@pytest.mark.parametrize("args, message", [
    ((11, "fp16", "fp32", False), "deploy-prune export DIR --format onnx --precision fp16"),
    ((11, "fp16", "fp32", False), r"--format tensorrt --precision fp16.*modelopt\.onnx\.autocast"),
    ((11, "int8", "fp32", False), r"calibration.*removed.*modelopt\.onnx\.quantization --onnx_path.*precision='int8'"),
    ((11, "int8", "fp16", False), r"--quantize_mode int8"),
    ((11, "bf16", "fp32", False), r"does not export bf16.*--low_precision_type bf16"),
    ((11, "fp16", "fp16", True), r"QuantizeLinear/DequantizeLinear.*precision='int8'"),
    ((11, "fp32", "fp16", False), r"fp16-typed.*precision='fp16'"),
    ((11, "fp8", "fp32", False), "precision 'fp8'"),
])
def test_plan_build_errors_name_the_fix(args, message):
    with pytest.raises(ValueError, match=message):
        plan_build(*args)


def test_plan_build_on_a_fresh_tensorrt_11():
    # a fresh 11.x install gets working fp32/tf32/fp16 builds from the right graphs
    assert plan_build(11, "fp32").clear_flags == ("TF32",)
    assert plan_build(11, "fp16", "fp16").set_flags == ()


def test_bench_tensorrt_backend_on_tensorrt_11(tmp_path):
    from bench.backends._base import Artifact, BackendOptions
    from bench.backends.onnx_cache import onnx_file
    from bench.backends.trt import strong_typing_reason

    reason = strong_typing_reason(11, "int8")
    assert reason and "calibration" in reason and "\n" not in reason and "does not support" not in reason
    assert "bf16" in (strong_typing_reason(11, "bf16") or "")
    assert strong_typing_reason(10, "int8") is None and strong_typing_reason(None, "int8") is None
    assert all(strong_typing_reason(11, p) is None for p in ("fp32", "fp16"))
    model = make_model("small_vgg")
    plan = ModelPlan("small_vgg", 10, 3, 32)
    artifact = Artifact("slim", tmp_path, model, plan, tmp_path)
    path = onnx_file(artifact, torch.zeros(2, 3, 32, 32), BackendOptions(), "fp16")
    assert path.name == "slim-fp16.onnx" and read_metadata(path)["precision"] == "fp16"
    assert onnx_file(artifact, torch.zeros(2, 3, 32, 32), BackendOptions(), "fp16") is path  # cached
    assert "onnx" not in artifact._cache  # the fp32 file ort/ort-trt share is a separate entry


# --- the format registry ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS.names())
def test_every_format_conforms(fmt):
    spec = FORMATS.get(fmt)
    assert callable(spec.export) and spec.suffix.startswith(".") and spec.help
    assert COMMON_OPTIONS <= spec.options


def test_export_model_dir_rejects_unknown_formats_and_options(tmp_path):
    with pytest.raises(KeyError, match="onnx"):
        export_model_dir(tmp_path, "tflite", tmp_path / "m")
    with pytest.raises(TypeError, match="workspace_gb"):
        export_model_dir(tmp_path, "onnx", tmp_path / "m.onnx", workspace_gb=1.0)


# --- AOTInductor ------------------------------------------------------------------------------------

@pytest.mark.slow  # 20-35 s on 2 cores: inductor generates and compiles C++
def test_aoti_cpu_package_loads_and_matches(tmp_path):
    model = make_model("resnet20")
    out = export_aoti(model, torch.zeros(2, 3, 32, 32), tmp_path / "r20.pt2", max_batch=16)
    sidecar = json.loads((tmp_path / "r20.pt2.json").read_text())
    assert set(sidecar["parity"]["max_abs_diff"]) == {"1", "7"} and sidecar["device"] == "cpu"
    runner = load_aoti(out)
    for b in (1, 7, 16):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.pt2", "r20.pt2.json"]


def test_aoti_rejects_bad_paths_and_packages(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_aoti(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "m.so")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        load_aoti(bad)
    with pytest.raises(FileNotFoundError):
        load_aoti(tmp_path / "missing.pt2")


def test_aoti_cuda_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; test_aoti_cuda covers it")
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        export_aoti(make_model("small_vgg"), torch.zeros(2, 3, 32, 32), tmp_path / "m.pt2", device="cuda")


# --- INT8 calibration data --------------------------------------------------------------------------

def test_rebatch_regroups_into_full_batches():
    xs = [torch.full((5, 1, 2, 2), float(i)) for i in range(4)]  # 20 images
    out = rebatch(iter(xs), batch_size=6, count=10, shape=(1, 2, 2))
    assert [b.shape[0] for b in out] == [6, 6, 6]
    assert out[1][0, 0, 0, 0] == 1.0  # image 6 came from the second source batch
    with pytest.raises(ValueError, match="model takes"):
        rebatch(iter(xs), batch_size=6, count=1, shape=(3, 2, 2))


def test_calibration_batches_come_from_the_model_dirs_dataset():
    plan = ModelPlan("small_vgg", 10, 1, 8, info={"config": {"data": {"name": "digits"}}})
    a = calibration_batches(plan, count=3, batch_size=16)
    b = calibration_batches(plan, count=3, batch_size=16)
    assert [tuple(x.shape) for x in a] == [(16, 1, 8, 8)] * 3
    assert a[0].std() > 0.1  # real images, not zeros
    torch.testing.assert_close(torch.cat(a), torch.cat(b))  # deterministic


def test_int8_calibration_says_where_its_images_came_from():
    with_data = ModelPlan("small_vgg", 10, 1, 8, info={"config": {"data": {"name": "digits"}}})
    batches, source = calibration_for(with_data, count=2, batch_size=16)
    assert source == "dataset:digits" and [tuple(x.shape) for x in batches] == [(16, 1, 8, 8)] * 2
    # a plan without a dataset (the suite's random-weight models): seeded random images, said so
    no_data = ModelPlan("vgg16", 1000, 3, 32)
    r1, source = calibration_for(no_data, count=2, batch_size=4)
    r2, _ = calibration_for(no_data, count=2, batch_size=4)
    assert source == RANDOM_SOURCE and [tuple(x.shape) for x in r1] == [(4, 3, 32, 32)] * 2
    torch.testing.assert_close(torch.cat(r1), torch.cat(r2))
    # a dataset that does not fit the model falls back to random, not to a wrong-shaped calibration
    wrong = ModelPlan("small_vgg", 10, 3, 32, info={"config": {"data": {"name": "digits"}}})
    assert calibration_for(wrong, count=1, batch_size=4)[1] == RANDOM_SOURCE


# --- CUDA (where present) ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_aoti_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    model = make_model("resnet20")
    out = export_aoti(model, torch.zeros(2, 3, 32, 32), tmp_path / "r20_cuda.pt2", device="cuda")
    x = torch.randn(7, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model.cuda()(x)
        scale = float(ref.abs().max().clamp(min=1.0))
        torch.testing.assert_close(load_aoti(out, "cuda")(x), ref, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.gpu
def test_onnx_under_cuda_execution_provider(vgg_onnx):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
    model, path = vgg_onnx
    diffs = verify_onnx(path, model, providers=["CUDAExecutionProvider"], rtol=1e-2, atol=1e-3)
    assert set(diffs) == {1, 7}


# --- the command line -------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_exports_a_slim_model_dir_with_parity_and_provenance(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path, "resnet20", slim=True)  # odd widths, residual groups
    out = tmp_path / "slim.onnx"
    rc, stdout, _ = run_cli(capsys, model_dir, "--format", "onnx", "--out", out, "--opset", "18")
    assert rc == 0 and stdout.count("\n") == 1 and str(out) in stdout
    model, plan = load_model_dir(model_dir)
    assert max(verify_onnx(out, model).values()) < 1e-3
    meta = read_metadata(out)
    cost = count(model, plan.example())
    assert meta["flops"] == cost.flops and meta["params"] == cost.params
    assert meta["plan_sha256"] == plan.digest() == json.loads((model_dir / "plan.json").read_text())["plan_sha256"]
    assert meta["source_dir"] == str(model_dir.resolve())
    assert meta["pruned"] is True and meta["arch"] == "resnet20" and meta["input_shape"] == [3, 32, 32]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["onnx"] == onnx.__version__
    assert meta["versions"]["onnxruntime"] == ort.__version__
    assert meta["opset"] == 18 and meta["dynamic_batch"] is True
    assert all(isinstance(p.value, str) for p in onnx.load(str(out)).metadata_props)


def _truncated(root: Path) -> Path:
    d = make_model_dir(root, name="truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def _foreign(root: Path) -> Path:
    d = root / "foreign"
    d.mkdir()
    (d / "plan.json").write_text(json.dumps({"format": "someone-else@3", "arch": "x"}))
    return d


def _corrupt_plan(root: Path) -> Path:
    d = make_model_dir(root, name="corrupt_plan")
    (d / "plan.json").write_text("{ not json")
    return d


def _empty(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


BAD_DIRS = {"missing": lambda root: root / "nope", "empty": _empty, "foreign": _foreign,
            "truncated weights": _truncated, "corrupt plan": _corrupt_plan}


@pytest.mark.parametrize("case", BAD_DIRS)
def test_cli_bad_model_dir_is_one_line(case, tmp_path, capsys):
    model_dir = BAD_DIRS[case](tmp_path)
    out = tmp_path / "out" / "m.onnx"
    rc, stdout, stderr = run_cli(capsys, model_dir, "--format", "onnx", "--out", out)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("deploy-prune export: error: ")
    assert not out.exists()


def test_cli_existing_output_and_inapplicable_option(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path)
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "onnx", "--out", out)
    assert rc == 2 and "--force" in stderr and stderr.count("\n") == 1
    assert out.read_text() == "keep me"
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "onnx", "--out", out, "--force", "--workspace-gb", "1")
    assert rc == 2 and "--workspace-gb" in stderr and stderr.count("\n") == 1
    assert out.read_text() == "keep me"
    # --precision applies to onnx, but only fp32 and fp16: int8 is refused, naming the Q/DQ route
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "onnx", "--out", out, "--force", "--precision", "int8")
    assert rc == 2 and "--precision" in stderr and "modelopt" in stderr and stderr.count("\n") == 1
    assert out.read_text() == "keep me"


def test_cli_parity_failure_exits_nonzero_and_keeps_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(to_onnx, "fold_batchnorm", corrupting_fold)
    model_dir = make_model_dir(tmp_path)
    out_dir = tmp_path / "out"
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "onnx", "--out", out_dir / "m.onnx")
    assert rc == 2 and "differs from PyTorch" in stderr and stderr.count("\n") == 1
    assert list(out_dir.iterdir()) == []


def test_cli_tensorrt_without_it_names_what_is_missing(tmp_path, capsys):
    try:
        export.to_trt.require_tensorrt()
    except BackendUnavailableError as e:
        missing = "tensorrt" if "package" in str(e) else "CUDA GPU"
    else:
        pytest.skip("tensorrt and a CUDA GPU are both present: nothing is missing to name "
                    "(tests/test_export_trt.py builds engines there)")
    model_dir = make_model_dir(tmp_path)
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "tensorrt", "--out", tmp_path / "m.engine")
    assert rc == 2 and missing in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "m.engine").exists()


def test_cli_aoti_needs_pt2_suffix(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path)
    rc, _, stderr = run_cli(capsys, model_dir, "--format", "aoti", "--out", tmp_path / "m.zip")
    assert rc == 2 and ".pt2" in stderr and stderr.count("\n") == 1


def test_parity_is_relative_to_the_output_scale():
    """Outputs around 1e-14 that differ completely must fail (a fixed atol passed them); normal
    outputs keep the absolute floor for tiny differences."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 10, generator=g) * 1e-14
    other = torch.randn(2, 10, generator=g) * 1e-14  # unrelated values of the same size
    with pytest.raises(ParityError, match="output scale"):
        check_close(other, ref, rtol=1e-3, atol=1e-4, what="t")
    check_close(ref * (1 + 1e-5), ref, rtol=1e-3, atol=1e-4, what="t")  # same values, rounding apart
    normal = torch.randn(2, 10, generator=g)
    near_zero = normal.clone()
    near_zero[0, 0] = 0.0
    check_close(near_zero + 5e-5, near_zero, rtol=1e-3, atol=1e-4, what="t")  # absolute floor holds
    with pytest.raises(ParityError):
        check_close(near_zero + 5e-4, near_zero, rtol=1e-6, atol=1e-4, what="t")
    with pytest.raises(ParityError, match="NaN"):
        check_close(torch.full((2,), float("nan")), torch.ones(2), rtol=1, atol=1, what="t")
    # huge logits (random Inception-v3: 4e7): float32 rounding moves a small output by ~2e-6 of the
    # scale, which rtol * |its own value| does not cover; an error of 1e-3 of the scale still fails
    huge = torch.randn(2, 10, generator=g) * 4e7
    huge[0, 0] = 1e3
    check_close(huge + 84.0, huge, rtol=1e-3, atol=1e-4, what="t")
    with pytest.raises(ParityError, match="output scale"):
        check_close(huge + 4e4, huge, rtol=1e-3, atol=1e-4, what="t")


def test_top1_agreement_on_real_inputs_fails_when_decisions_differ():
    from export.parity import top1_agreement

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, generator=g), None) for _ in range(4)]
    ref = lambda x: x  # noqa: E731  (class = argmax of the input)
    frac, n = top1_agreement(lambda x: x * 1.0001, ref, batches, what="t")
    assert (frac, n) == (1.0, 32)
    with pytest.raises(ParityError, match="top-1 agrees"):
        top1_agreement(lambda x: -x, ref, batches, what="t")
    assert top1_agreement(lambda x: x, ref, batches, max_samples=10, what="t")[1] == 10
