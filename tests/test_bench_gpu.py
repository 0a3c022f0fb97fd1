"""Every bench backend on CUDA (``pytest -m gpu``; ``-m "gpu or trt"`` adds TensorRT's marks).

Each backend's prepared artifact is checked against the fp32 PyTorch model on the CPU (fresh
random inputs, tolerance by precision), then timed in a short sweep whose rows must be ``ok`` with
device-time columns and a device speedup, or ``skipped`` with the backend's own reason (a package
such as onnxruntime-gpu or tensorrt missing on this machine). ``compile`` is checked to have
really compiled (Dynamo captured a graph per shape) and, with CUDA graphs, to return outputs that
the next replay does not overwrite. Without a GPU every test here is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import sweep
from bench.backends import BACKENDS, BackendOptions
from bench.backends import torch_compile as tc
from bench.sweep import BenchConfig, load_artifact
from bench.timing import TimingConfig
from conftest import half_width_pair

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

BATCHES = (1, 8)
QUICK = TimingConfig(warmup_s=0.2, warmup_iters=5, min_time_s=0.1, rounds=4, min_samples=16, min_per_round=2)
# relative to the output's scale: fp32 may run TF32 convolutions; half precisions round inputs and weights
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 8e-2, "int8": 0.5}
COMBOS = [("torch", "fp32"), ("torch", "fp16"), ("torch", "bf16"), ("compile", "fp32"),
          ("compile", "fp16"), ("aoti", "fp32"), ("ort", "fp32"), ("ort-trt", "fp32"),
          ("ort-trt", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16")]


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.trt] if name in ("tensorrt", "ort-trt") else []


def test_every_backend_is_covered() -> None:
    assert {n for n, _ in COMBOS} == set(BACKENDS.names())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    return half_width_pair(root)


def _options(mode: str = "default") -> BackendOptions:
    return BackendOptions(threads=1, max_batch=max(BATCHES), compile_mode=mode)


def _check_parity(backend, model: torch.nn.Module, precision: str) -> None:
    """The backend's output on fresh random inputs against the fp32 model on the CPU."""
    for batch in BATCHES:
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            ref = model(x)
        got = backend.download(backend.run(backend.upload(x)))
        assert got.shape == ref.shape and torch.isfinite(got).all()
        err = float((got - ref).norm() / ref.norm().clamp(min=1e-6))
        assert err < TOLERANCE[precision], f"{backend.name} {precision} b{batch}: relative error {err:.2e}"


@needs_cuda
@pytest.mark.parametrize("name,precision",
                         [pytest.param(n, p, marks=_marks(n), id=f"{n}-{p}") for n, p in COMBOS])
def test_backend_on_cuda_matches_the_model_and_times(name: str, precision: str, model_dirs, tmp_path) -> None:
    cls = BACKENDS.get(name)
    reason = cls.unavailable("cuda", precision, _options())
    cfg = BenchConfig(backends=(name,), devices=("cuda",), precisions=(precision,), batches=BATCHES,
                      threads=1, timing=QUICK, n_boot=200, compile_mode="reduce-overhead")
    df = sweep.run(*model_dirs, tmp_path / "out", cfg)
    if reason:
        assert set(df["status"]) == {"skipped"} and set(df["error"]) == {reason}
        pytest.skip(f"{name} {precision} unavailable here: {reason}")
    assert set(df["status"]) == {"ok"}, df["error"].tolist()
    slim = df[df["variant"] == "slim"]
    assert slim["device_speedup"].notna().all() and (df["device_p50_ms"] > 0).all()
    assert (slim["device_speedup_ci_low"] <= slim["device_speedup"]).all()
    assert df["gpu_name"].notna().all()
    if name in ("torch", "compile", "aoti"):
        assert df["cudnn_benchmark"].astype(bool).all()
    art = load_artifact("slim", model_dirs[1], tmp_path / "parity")
    backend = cls(device="cuda", precision=precision, options=_options())
    backend.prepare(art, art.plan.example(2))
    try:
        _check_parity(backend, art.model, precision)
    finally:
        backend.close()


@needs_cuda
def test_compile_really_compiles_each_shape_and_cuda_graph_outputs_survive(model_dirs, tmp_path) -> None:
    art = load_artifact("slim", model_dirs[1], tmp_path)
    backend = tc.CompileBackend(device="cuda", precision="fp32", options=_options("reduce-overhead"))
    backend.prepare(art, art.plan.example(2))
    try:
        before = tc.compiled_graphs()
        x1, x2 = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
        for _ in range(3):  # CUDA graphs are recorded after warm-up calls
            out1 = backend.run(backend.upload(x1))
        assert tc.compiled_graphs() > before, "torch.compile ran the model without capturing a graph"
        out2 = backend.run(backend.upload(x2))  # a replay; out1 must not be overwritten by it
        with torch.no_grad():
            ref1, ref2 = art.model(x1), art.model(x2)
        for got, ref in ((out1, ref1), (out2, ref2)):
            assert float((got.float().cpu() - ref).norm() / ref.norm()) < TOLERANCE["fp32"]
        assert backend.describe()["compiled_shapes"] == 1
    finally:
        backend.close()


@needs_cuda
@pytest.mark.trt
def test_tensorrt_runner_uses_its_own_stream(model_dirs, tmp_path) -> None:
    reason = BACKENDS.get("tensorrt").unavailable("cuda", "fp32", _options())
    if reason:
        pytest.skip(reason)
    art = load_artifact("slim", model_dirs[1], tmp_path)
    backend = BACKENDS.get("tensorrt")(device="cuda", precision="fp32", options=_options())
    backend.prepare(art, art.plan.example(2))
    try:
        assert backend.timing_stream() != torch.cuda.current_stream()
        assert backend.timing_stream().cuda_stream != torch.cuda.default_stream().cuda_stream
        _check_parity(backend, art.model, "fp32")
    finally:
        backend.close()


@needs_cuda
def test_gpu_rows_render_both_speedups(model_dirs, tmp_path) -> None:
    cfg = BenchConfig(backends=("torch",), devices=("cuda",), precisions=("fp16",), batches=(1,),
                      threads=1, timing=QUICK, n_boot=200)
    sweep.run(*model_dirs, tmp_path, cfg)
    text = (tmp_path / "report.md").read_text()
    assert "device speedup [95% CI]" in text and "Efficiency uses the end-to-end speedup" in text
    assert isinstance(pd.read_csv(tmp_path / "results.csv"), pd.DataFrame)
