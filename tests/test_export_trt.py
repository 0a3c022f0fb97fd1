"""TensorRT engines: build, verify on the GPU, sidecars, timing cache, INT8 calibration.

Every test here needs the ``tensorrt`` package (TensorRT 10+) and a CUDA GPU, and skips naming
whichever is missing. What works without them (garbage ONNX, bad settings, the missing-package
error) is tested in test_export.py.
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
from export.to_trt import PRECISIONS, TRTRunner, build_engine, calib_path, layers_path, sidecar_path

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
def vgg(tmp_path_factory):
    model = make_model("small_vgg")
    path = export_onnx(model, torch.zeros(2, 3, 32, 32), tmp_path_factory.mktemp("trt") / "vgg.onnx")
    return model, path


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "int8"])
def test_engine_matches_pytorch(precision, vgg, tmp_path):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 or newer")
    model, onnx_path = vgg
    out = build_engine(onnx_path, tmp_path / f"{precision}.engine", precision=precision, min_batch=1,
                       opt_batch=4, max_batch=16, model=model)
    side = json.loads(sidecar_path(out).read_text())
    assert side["precision"] == precision and side["profile"] == {"min": 1, "opt": 4, "max": 16}
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


def test_timing_cache_is_written_and_reused(vgg, tmp_path):
    model, onnx_path = vgg
    cache = tmp_path / "timing.cache"
    build_engine(onnx_path, tmp_path / "a.engine", precision="fp16", max_batch=8, timing_cache=cache)
    first = cache.stat().st_size
    assert first > 0
    build_engine(onnx_path, tmp_path / "b.engine", precision="fp16", max_batch=8, timing_cache=cache)
    assert cache.stat().st_size >= first


def test_int8_calibrates_and_writes_its_cache(vgg, tmp_path):
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
    with pytest.raises(ValueError, match="calibration"):
        build_engine(vgg[1], tmp_path / "int8.engine", precision="int8")


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
    build_engine(static, tmp_path / "s.engine", min_batch=4, opt_batch=4, max_batch=4, model=model)


def test_cli_builds_an_engine_from_a_model_dir(tmp_path, capsys):
    model_dir = make_slim_dir(tmp_path, "resnet20")
    out = tmp_path / "slim.engine"
    rc = main(["export", str(model_dir), "--format", "tensorrt", "--out", str(out), "--precision", "fp16",
               "--max-batch", "32", "--timing-cache", str(tmp_path / "t.cache")])
    assert rc == 0 and out.is_file() and sidecar_path(out).is_file()
    assert json.loads(sidecar_path(out).read_text())["plan_sha256"]
    assert capsys.readouterr().out.count("\n") == 1
