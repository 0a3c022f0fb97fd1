"""The GPU code paths' fixes that a CPU can show: torch.compile's eager fallback is an error, its
cache is reset between models, the TF32 switch uses the new API, GPU suite stages have their own
timing, the pages show device speedups and precisions, ort-trt fp16 uses the fp16 export.
No absolute time is asserted.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bench import report, sweep
from bench.backends import BACKENDS, BackendOptions
from bench.backends import torch_compile as tc
from bench.backends._base import Artifact
from bench.studies.paper_claims import report as suite_report
from bench.studies.paper_claims.config import StageConfig, SuiteConfig, load_suite
from bench.studies.paper_claims.suite import stage_config
from bench.sweep import BenchConfig
from bench.timing import TimingConfig
from deploy_prune.artifacts import ModelPlan
from deploy_prune.models import build_model

QUICK = TimingConfig(warmup_s=0.0, warmup_iters=1, min_time_s=0.01, rounds=2, min_samples=2,
                     min_per_round=1)


# --- torch.compile: no silent eager fallback, a fresh cache per model ------------------------------

@pytest.fixture
def eager_dynamo(monkeypatch: pytest.MonkeyPatch):
    """``torch.compile`` through Dynamo's own caches and limits but the ``eager`` backend (no Inductor
    compilation: seconds, not minutes, on 2 cores); the recompile limit set to 1, as a long sweep
    reaches 64; Dynamo's caches empty before and after."""
    import torch._dynamo.config as dynamo_config

    real = torch.compile

    def compile_eagerly(model, **kwargs):
        return real(model, backend="eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr(tc, "RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()
    with dynamo_config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        yield
    torch._dynamo.reset()


def _artifact(tmp_path: Path, name: str, width: int = 4) -> Artifact:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(width * 6 * 6, 3)).eval()
    plan = ModelPlan("small_vgg", 3, 1, 8)
    return Artifact(name=name, path=tmp_path / name, model=model, plan=plan, workdir=tmp_path)


def _compile_backend(art: Artifact) -> tc.CompileBackend:
    b = tc.CompileBackend(device="cpu", precision="fp32", options=BackendOptions())
    b.prepare(art, torch.zeros(2, 1, 8, 8))
    return b


@pytest.mark.parametrize("raise_on_limit", [True, False], ids=["config-raises", "graph-counter"])
def test_compile_past_the_recompile_limit_is_an_error_not_eager(eager_dynamo, tmp_path: Path,
                                                                raise_on_limit: bool) -> None:
    import torch._dynamo.config as dynamo_config

    base, slim = (_compile_backend(_artifact(tmp_path, n, w)) for n, w in (("base", 4), ("slim", 2)))
    # graph-counter: a torch without fail_on_recompile_limit_hit; the captured-graph count catches it
    dynamo_config.fail_on_recompile_limit_hit = raise_on_limit
    x = torch.randn(1, 1, 8, 8)
    assert base.run(x).shape == (1, 3)
    # the slim model shares forward's code object; at the limit Dynamo would run it eagerly
    with pytest.raises(tc.CompileFallbackError, match="eager"):
        slim.run(x)


def test_compile_close_resets_dynamo_so_the_next_model_compiles(eager_dynamo, tmp_path: Path) -> None:
    first = _compile_backend(_artifact(tmp_path, "base", 4))
    first.run(torch.randn(1, 1, 8, 8))
    first.close()
    before = tc.compiled_graphs()
    second = _compile_backend(_artifact(tmp_path, "slim", 2))
    out = second.run(torch.randn(1, 1, 8, 8))  # a fresh cache: under the limit again
    assert tc.compiled_graphs() == before + 1 and out.shape == (1, 3)
    assert second.describe()["compiled_shapes"] == 1
    second.close()


def test_compile_outputs_of_cuda_graph_modes_are_cloned() -> None:
    assert {"reduce-overhead", "max-autotune"} <= set(tc.CUDA_GRAPH_MODES)
    assert "max-autotune-no-cudagraphs" not in tc.CUDA_GRAPH_MODES


def test_compile_fallback_is_an_error_row_in_the_sweep(eager_dynamo, small_vgg_dir: Path,
                                                       tmp_path: Path) -> None:
    """base and slim prepared together, as the sweep does: the slim's eager run is an error row."""
    cfg = BenchConfig(backends=("compile",), batches=(1,), timing=QUICK, n_boot=50, threads=1)
    df = sweep.run(small_vgg_dir, small_vgg_dir, tmp_path / "out", cfg)
    assert set(df["status"]) == {"error"}
    assert df["error"].str.contains("CompileFallbackError").all() and df["speedup"].isna().all()


# --- TF32: the new fp32_precision API where it exists -----------------------------------------------

def test_strict_fp32_uses_the_new_tf32_api_and_restores_it() -> None:
    from export.to_trt import _strict_fp32

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy allow_tf32 flags")
    conv = torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # as a user (or torch.compile) sets it with the new API
        with _strict_fp32():  # the legacy flags' getter raises after this on torch >= 2.9
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert matmul.fp32_precision == "tf32" and conv.fp32_precision == saved[1]
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_cuda_settings_set_and_record_cudnn_benchmark() -> None:
    from bench.backends._base import apply_cuda_settings

    saved = torch.backends.cudnn.benchmark
    try:
        got = apply_cuda_settings(BackendOptions(cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark is True and got["cudnn_benchmark"] is True
        assert got["conv_fp32_precision"] in {"ieee", "tf32", "none"}
        assert apply_cuda_settings(BackendOptions(cudnn_benchmark=False))["cudnn_benchmark"] is False
    finally:
        torch.backends.cudnn.benchmark = saved
    assert BenchConfig().options().cudnn_benchmark is True


# --- ort-trt fp16: the fp16 ONNX export, not trt_fp16_enable ----------------------------------------

def test_ort_trt_fp16_uses_the_fp16_export_and_no_builder_flag(tmp_path: Path) -> None:
    cls = BACKENDS.get("ort-trt")
    b = cls(device="cuda", precision="fp16", options=BackendOptions(max_batch=8))
    assert b.onnx_precision() == "fp16"
    assert cls(device="cuda", precision="fp32").onnx_precision() == "fp32"
    assert BACKENDS.get("ort")(device="cpu", precision="fp32").onnx_precision() == "fp32"
    b.stream = SimpleNamespace(cuda_stream=0)  # what prepare() makes on a GPU
    art = _artifact(tmp_path, "slim")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        trt_opts = dict(b.providers(art, torch.zeros(2, 1, 8, 8))[0][1])
    assert trt_opts["trt_fp16_enable"] is False


# --- the TensorRT backend times on its own stream ---------------------------------------------------

def test_tensorrt_backend_times_on_its_own_stream() -> None:
    cls = BACKENDS.get("tensorrt")
    b = cls(device="cuda", precision="fp16")
    b.stream = object()  # what prepare() makes: a torch.cuda.Stream of its own
    assert b.timing_stream() is b.stream  # not torch.cuda.current_stream()


# --- suite: GPU stages get their own timing ---------------------------------------------------------

def test_gpu_stages_take_the_gpu_timing() -> None:
    cfg = load_suite(None)
    point = cfg.points[0]
    cpu = stage_config(cfg, StageConfig("c", ["torch"]), point).timing
    gpu = stage_config(cfg, StageConfig("g", ["torch"], devices=["cuda"]), point).timing
    assert cpu.clock == "cpu" and gpu.clock == "wall"
    assert gpu.warmup_s >= 1.0 and gpu.warmup_s > cpu.warmup_s  # time-based: clocks ramp up
    assert gpu.rounds > cpu.rounds and gpu.min_samples >= 100
    own = SuiteConfig().timing
    staged = stage_config(cfg, StageConfig("g2", ["torch"], devices=["cuda"], timing=own), point).timing
    assert staged.rounds == own.rounds and staged.clock == "wall"


def test_gpu_timing_must_be_wall_clock() -> None:
    from deploy_prune.config import ConfigError

    with pytest.raises(ConfigError, match="gpu_timing.clock"):
        load_suite(None, ["gpu_timing.clock=cpu"])


# --- the pages: precision column, no collapsed fp16/bf16, device speedup, device in the title -------

def _suite_rows() -> pd.DataFrame:
    """Measured rows of one point: fp16 and bf16 slim rows of one stage, with device speedups."""
    rows = []
    for precision, sp, dev in (("fp16", 1.5, 2.5), ("bf16", 1.2, 2.0)):
        common = {"model": "resnet50", "operating_point": "resnet50-OSPR-2.8x", "source": "OSPR",
                  "target_flops_reduction": 2.8, "rounding": 8, "stage": "gpu-torch", "backend": "torch",
                  "device": "cuda", "precision": precision, "batch": 32, "status": "ok", "threads": 1,
                  "clock": "wall", "gpu_name": "NVIDIA H200", "flops": 1e9, "params": 1e6,
                  "p99_ms": 4.0, "top1": np.nan}
        rows.append({**common, "variant": "base", "p50_ms": 3.0, "flops_reduction": 1.0})
        rows.append({**common, "variant": "slim", "p50_ms": 3.0 / sp, "flops_reduction": 2.8, "speedup": sp,
                     "speedup_ci_low": sp - 0.1, "speedup_ci_high": sp + 0.1, "efficiency": sp / 2.8,
                     "device_speedup": dev, "device_speedup_ci_low": dev - 0.1,
                     "device_speedup_ci_high": dev + 0.1})
    return pd.DataFrame(rows)


def test_suite_summary_keeps_fp16_and_bf16_apart_and_shows_both_speedups() -> None:
    s = suite_report.slim_rows(_suite_rows())
    summ = suite_report.summary(s)
    assert sorted(summ["precision"]) == ["bf16", "fp16"]  # the old summary kept one of the two
    cols = suite_report.row_columns(s)
    headers = [h for _, h, _ in cols]
    assert "precision" in headers and "device speedup [95% CI]" in headers
    table = report.markdown_table(summ, cols)
    assert "fp16" in table and "bf16" in table and "2.50 [2.40, 2.60]" in table


def test_suite_plot_title_names_the_device(tmp_path: Path) -> None:
    s = suite_report.slim_rows(_suite_rows())
    assert suite_report.device_label(s) == "NVIDIA H200"
    cpu = s.assign(device="cpu")
    assert suite_report.device_label(cpu) == "CPU"
    fig_path = suite_report.plot(s, tmp_path / "p.png")
    assert fig_path.read_bytes()[:4] == b"\x89PNG"


def test_bench_report_shows_device_speedup_beside_end_to_end() -> None:
    df = _suite_rows()
    text = report.markdown_table(report.speedup_view(df), report.speedup_columns(df))
    assert "device speedup [95% CI]" in text and "2.500 [2.400, 2.600]" in text
    assert "Efficiency uses the end-to-end speedup" in report.device_note(df)
    cpu = df.drop(columns=[c for c in df.columns if c.startswith("device_")]).assign(device="cpu")
    assert report.speedup_columns(cpu) == report.SPEEDUP_COLUMNS and report.device_note(cpu) == ""
    assert np.isclose(report.speedup_view(df)["speedup"], [1.5, 1.2]).all()


def test_plain_model_builds_for_tests() -> None:
    assert build_model("small_vgg", num_classes=10, in_channels=1) is not None
