"""TensorRT engines: build, verify on the GPU, sidecars, timing cache, INT8 calibration.

Every test here needs the ``tensorrt`` package (TensorRT 10+) and a CUDA GPU, and skips naming
whichever is missing. What works without them (garbage ONNX, bad settings, the missing-package
error, the TensorRT 10/11 build decision ``plan_build``) is tested in test_export.py.

TensorRT 10 builds weakly typed from the fp32 graph; TensorRT 11+ strongly typed, so its fp16
engines are built from the fp16 export, its int8 engines from a Q/DQ graph, and implicit int8
calibration is checked to be refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deploy_prune.artifacts import ModelPlan, save_model_dir
from deploy_prune.cli import main
from deploy_prune.models import build_model
from deploy_prune.nodes import discover
from deploy_prune.surgery import apply_plan
from export.errors import ParityError
from export.to_onnx import export_onnx
from export.to_trt import (
    PRECISIONS,
    STRONG_TYPING_MAJOR,
    TRTRunner,
    build_engine,
    calib_path,
    layers_path,
    onnx_precision_for,
    sidecar_path,
    tensorrt_major,
)

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


def make_model(arch: str, *, seed: int = 0) -> nn.Module:
    """A registered model with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_slim_dir(root: Path, arch: str) -> Path:
    """A model directory whose prunable nodes keep a random ~60% of their channels."""
    model, example = make_model(arch), torch.zeros(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    kept = {n.name: sorted(torch.randperm(n.channels, generator=g)[: max(1, int(0.6 * n.channels) - 1)].tolist())
            for n in discover(model, example) if n.prunable}
    apply_plan(model, kept, example)
    return save_model_dir(model, ModelPlan(arch, 10, 3, 32, kept=kept), root / "slim")


@pytest.fixture(scope="module", autouse=True)
def needs_tensorrt_and_gpu():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("needs the tensorrt Python package (TensorRT 10+): not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")


@pytest.fixture(scope="module")
def major() -> int:
    import tensorrt

    return tensorrt_major(tensorrt)


@pytest.fixture(scope="module")
def strong(major) -> bool:
    """TensorRT 11+: every network strongly typed, no precision flags, no calibrator."""
    return major >= STRONG_TYPING_MAJOR


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    model = make_model("small_vgg")
    path = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path_factory.mktemp("trt") / "vgg.onnx")
    return model, path


@pytest.fixture(scope="module")
def vgg_fp16(vgg, tmp_path_factory):
    """The same model exported fp16 inside (fp32 IO): what TensorRT 11 builds fp16 from."""
    model, _ = vgg
    path = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path_factory.mktemp("trt16") / "vgg16.onnx",
                       precision="fp16")
    return model, path


def onnx_for(precision: str, major: int, vgg, vgg_fp16) -> Path:
    """The graph an engine of ``precision`` is built from on this TensorRT."""
    return (vgg_fp16 if onnx_precision_for(major, precision) == "fp16" else vgg)[1]


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "int8"])
def test_engine_matches_pytorch(precision, vgg, vgg_fp16, major, strong, tmp_path):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 or newer")
    model, _ = vgg
    onnx_path = onnx_for(precision, major, vgg, vgg_fp16)
    if strong and precision == "bf16":  # needs a bf16-typed graph, which deploy-prune does not export
        with pytest.raises(ValueError, match="low_precision_type bf16"):
            build_engine(onnx_path, tmp_path / "bf16.engine", precision="bf16", max_batch=16, model=model)
        assert list(tmp_path.iterdir()) == []
        return
    out = build_engine(onnx_path, tmp_path / f"{precision}.engine", precision=precision, min_batch=1,
                       opt_batch=4, max_batch=16, model=model)
    side = json.loads(sidecar_path(out).read_text())
    assert side["precision"] == precision and side["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert side["typing"] == ("strong" if strong else "weak") and side["int8_calibrated"] is False
    assert side["onnx_float_type"] == onnx_precision_for(major, precision)
    assert side["tensorrt"] and side["gpu"] and side["compute_capability"].count(".") == 1
    assert set(side["parity"]["max_abs_diff"]) == {"1", "7"} and side["build_seconds"] > 0
    layers = json.loads(layers_path(out).read_text())
    assert layers["num_layers"] > 0 and layers["reformat_layers"] == side["reformat_layers"] >= 0
    runner = TRTRunner(out)
    rtol, atol = side["parity"]["rtol"], side["parity"]["atol"]
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(runner(x).float(), model.cuda()(x), rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="batch range"):
        runner(torch.randn(17, 3, 32, 32, device="cuda"))
    with pytest.raises(ValueError, match="CUDA tensor"):
        runner(torch.randn(1, 3, 32, 32))


def test_fp32_graph_is_refused_for_fp16_on_tensorrt_11(vgg, strong, tmp_path):
    if not strong:
        pytest.skip("needs TensorRT 11+ (strong typing); the installed TensorRT 10 builds fp16 from an fp32 graph itself")
    with pytest.raises(ValueError, match="--format onnx --precision fp16"):
        build_engine(vgg[1], tmp_path / "fp16.engine", precision="fp16", max_batch=8)
    assert list(tmp_path.iterdir()) == []


def test_timing_cache_is_written_and_reused(vgg, vgg_fp16, major, tmp_path):
    onnx_path = onnx_for("fp16", major, vgg, vgg_fp16)
    cache = tmp_path / "timing.cache"
    build_engine(onnx_path, tmp_path / "a.engine", precision="fp16", max_batch=8, timing_cache=cache)
    first = cache.stat().st_size
    assert first > 0
    build_engine(onnx_path, tmp_path / "b.engine", precision="fp16", max_batch=8, timing_cache=cache)
    assert cache.stat().st_size >= first


def test_int8_calibrates_and_writes_its_cache(vgg, strong, tmp_path):
    if strong:
        pytest.skip("needs TensorRT 10: the installed TensorRT 11+ removed implicit int8 calibration "
                    "(test_int8_from_a_qdq_graph_on_tensorrt_11 covers it)")
    model, onnx_path = vgg
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    out = build_engine(onnx_path, tmp_path / "int8.engine", precision="int8", max_batch=8,
                       calibration_batches=batches, model=model)
    assert calib_path(out).stat().st_size > 0
    assert json.loads(sidecar_path(out).read_text())["int8_calibrated"] is True
    # a second build reuses the cache and needs no data
    build_engine(onnx_path, out, precision="int8", max_batch=8, force=True, model=model)


def test_int8_without_data_or_cache_is_an_error(vgg, tmp_path):
    # TensorRT 10: no calibration data; TensorRT 11+: no Q/DQ nodes (implicit calibration removed)
    with pytest.raises(ValueError, match="calibration"):
        build_engine(vgg[1], tmp_path / "int8.engine", precision="int8")


def qdq_onnx(fp32_onnx: Path, out: Path) -> Path:
    """An explicitly quantized (Q/DQ, symmetric int8) graph made by ONNX Runtime's static PTQ."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.batches = iter([{"input": torch.randn(4, 3, 32, 32, generator=g).numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def test_int8_from_a_qdq_graph_on_tensorrt_11(vgg, strong, tmp_path):
    if not strong:
        pytest.skip("needs TensorRT 11+; the installed TensorRT 10 calibrates int8 itself "
                    "(test_int8_calibrates_and_writes_its_cache covers it)")
    model, onnx_path = vgg
    qdq = qdq_onnx(onnx_path, tmp_path / "vgg_qdq.onnx")
    out = build_engine(qdq, tmp_path / "int8.engine", precision="int8", max_batch=8, model=model)
    side = json.loads(sidecar_path(out).read_text())
    assert side["typing"] == "strong" and side["onnx_qdq"] is True and side["int8_calibrated"] is False
    assert not calib_path(out).exists()


def test_parity_failure_keeps_no_engine(vgg, tmp_path):
    other = make_model("small_vgg", seed=1)  # not the model the ONNX file came from
    with pytest.raises(ParityError):
        build_engine(vgg[1], tmp_path / "wrong.engine", precision="fp32", max_batch=8, model=other)
    assert list(tmp_path.iterdir()) == []


def test_static_onnx_needs_a_matching_profile(tmp_path):
    model = make_model("small_vgg")
    static = export_onnx(model, torch.zeros(4, 3, 32, 32), tmp_path / "static.onnx", dynamic_batch=False)
    with pytest.raises(ValueError, match="static"):
        build_engine(static, tmp_path / "s.engine")
    build_engine(static, tmp_path / "s.engine", precision="fp32", min_batch=4, opt_batch=4, max_batch=4,
                 model=model)


def test_cli_builds_an_engine_from_a_model_dir(major, tmp_path, capsys):
    model_dir = make_slim_dir(tmp_path, "resnet20")
    out = tmp_path / "slim.engine"
    rc = main(["export", str(model_dir), "--format", "tensorrt", "--out", str(out), "--precision", "fp16",
               "--max-batch", "32", "--timing-cache", str(tmp_path / "t.cache")])
    assert rc == 0 and out.is_file() and sidecar_path(out).is_file()
    side = json.loads(sidecar_path(out).read_text())
    assert side["plan_sha256"] and side["precision"] == "fp16"
    # TensorRT 11+: the model-directory path exported the fp16 graph itself
    assert side["onnx_float_type"] == onnx_precision_for(major, "fp16")
    assert capsys.readouterr().out.count("\n") == 1
