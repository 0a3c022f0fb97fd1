"""Every registered backend on a tiny base/slim pair: a row each, ok or skipped with a reason;
failures become error rows; the written table, report and CLI. No absolute times are asserted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import sweep, table
from bench.backends import BACKENDS, Backend, BackendOptions, register
from bench.backends.torch_eager import TorchBackend
from bench.sweep import BenchConfig
from bench.timing import TimingConfig
from conftest import half_width_pair
from deploy_prune.cli import main

SLOW = {"compile", "aoti"}  # Inductor C++ compilation takes tens of seconds on 2 cores
FAST = tuple(n for n in BACKENDS.names() if n not in SLOW)
BATCHES = (1, 2)
QUICK = TimingConfig(warmup_s=0.0, warmup_iters=2, min_time_s=0.05, rounds=4, min_samples=8,
                     min_per_round=2)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """small_vgg (random weights) and a copy keeping the first half of every node's channels."""
    root = tmp_path_factory.mktemp("bench-models")
    return half_width_pair(root)


def quick_config(backends: tuple[str, ...], **kw) -> BenchConfig:
    return BenchConfig(backends=backends, devices=("cpu", "cuda"), batches=BATCHES, threads=1,
                       timing=QUICK, n_boot=200, **kw)


@pytest.fixture(scope="module")
def fast_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-out")


@pytest.fixture(scope="module")
def fast_run(model_dirs: tuple[Path, Path], fast_out: Path) -> pd.DataFrame:
    """Every fast backend on cpu and cuda, batches 1 and 2, with accuracy on 64 samples."""
    cfg = quick_config(FAST, accuracy=True, max_eval_samples=64)
    return sweep.run(*model_dirs, fast_out, cfg, command="pytest")


def _run_one(name: str, model_dirs: tuple[Path, Path], out: Path) -> pd.DataFrame:
    return sweep.run(*model_dirs, out, quick_config((name,)))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in BACKENDS.names()])
def test_every_backend_gives_a_row_per_config(name: str, fast_run: pd.DataFrame,
                                              model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    df = fast_run if name in FAST else _run_one(name, model_dirs, tmp_path)
    cls = BACKENDS.get(name)
    for device in ("cpu", "cuda"):
        rows = df[(df["backend"] == name) & (df["device"] == device)]
        assert sorted(zip(rows["variant"], rows["batch"])) == sorted(
            (v, b) for v in ("base", "slim") for b in BATCHES)
        reason = cls.unavailable(device, "fp32", BackendOptions(threads=1, max_batch=max(BATCHES)))
        if reason:
            assert set(rows["status"]) == {"skipped"} and set(rows["error"]) == {reason}
            continue
        assert set(rows["status"]) == {"ok"}, rows["error"].tolist()
        slim = rows[rows["variant"] == "slim"]
        assert (slim["speedup_ci_low"] <= slim["speedup"]).all()
        assert (slim["speedup"] <= slim["speedup_ci_high"]).all()
        assert (rows["p50_ms"] <= rows["p90_ms"]).all() and (rows["p90_ms"] <= rows["p99_ms"]).all()


def test_unavailable_backends_are_skipped_with_reasons(fast_run: pd.DataFrame) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so no CUDA row is skipped for want of it; "
                    "test_every_backend_gives_a_row_per_config checks those rows measured")
    cuda = fast_run[fast_run["device"] == "cuda"]
    assert set(cuda["status"]) == {"skipped"}
    assert cuda["error"].str.contains("CUDA").all()
    for name in ("tensorrt", "ort-trt"):
        cpu = fast_run[(fast_run["backend"] == name) & (fast_run["device"] == "cpu")]
        assert set(cpu["status"]) == {"skipped"} and cpu["error"].str.contains("does not run on cpu").all()


def test_results_have_every_column_and_agree(fast_run: pd.DataFrame) -> None:
    ok = fast_run[fast_run["status"] == "ok"]
    assert set(table.REQUIRED) <= set(fast_run.columns)
    slim, base = ok[ok["variant"] == "slim"], ok[ok["variant"] == "base"]
    assert len(slim) and len(base)
    red = slim["flops_reduction"].iloc[0]
    assert red == pytest.approx(base["flops"].iloc[0] / slim["flops"].iloc[0])
    assert red > 3.0  # half the channels of every conv: ~4x fewer multiply-adds
    pd.testing.assert_series_equal(slim["efficiency"], slim["speedup"] / slim["flops_reduction"],
                                   check_names=False)
    assert ok["throughput_ips"].tolist() == pytest.approx((ok["batch"] * 1000.0 / ok["mean_ms"]).tolist())
    assert ok["top1"].between(0, 100).all() and (ok["top1_samples"] == 64).all()
    assert (ok["threads"] == 1).all() and ok["cpu_model"].notna().all()


def test_written_files(fast_run: pd.DataFrame, fast_out: Path) -> None:
    out_dir = fast_out
    data = json.loads((out_dir / "results.json").read_text())
    assert isinstance(data, list) and len(data) == len(fast_run)
    assert all(set(table.REQUIRED) <= set(r) for r in data)
    csv = pd.read_csv(out_dir / "results.csv")
    assert set(table.REQUIRED) <= set(csv.columns) and len(csv) == len(fast_run)
    report = (out_dir / "report.md").read_text()
    assert "## Speedup of slim over base" in report and "pytest" in report
    for png in ("latency_vs_batch.png", "speedup_vs_flops.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "artifacts" / "slim" / "slim.onnx").is_file()
    env = json.loads((out_dir / "environment.json").read_text())
    assert env["environment"]["threads"] == 1 and "torch" in env["environment"]["versions"]


def test_failures_become_error_rows(model_dirs: tuple[Path, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = TorchBackend.run

    def run_or_oom(self: TorchBackend, inputs: torch.Tensor):
        if inputs.shape[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return real_run(self, inputs)

    monkeypatch.setattr(TorchBackend, "run", run_or_oom)
    cfg = BenchConfig(backends=("torch",), batches=BATCHES, threads=1, timing=QUICK, n_boot=50)
    df = sweep.run(*model_dirs, tmp_path, cfg)
    by_batch = df.set_index(["variant", "batch"])["status"]
    assert by_batch[("slim", 1)] == "ok" and by_batch[("slim", 2)] == "error"
    err = df[df["status"] == "error"]["error"]
    assert (err == "RuntimeError: CUDA out of memory (simulated)").all()


def test_prepare_failure_gives_error_rows(model_dirs: tuple[Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: TorchBackend, artifact, example) -> None:
        raise ValueError("cannot prepare")

    monkeypatch.setattr(TorchBackend, "prepare", broken)
    df = sweep.run(*model_dirs, tmp_path, BenchConfig(backends=("torch",), batches=BATCHES,
                                                      threads=1, timing=QUICK))
    assert set(df["status"]) == {"error"} and len(df) == 4
    assert set(df["error"]) == {"ValueError: cannot prepare"}


def test_aa_run_on_the_cpu_clock(model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = model_dirs
    timing = dataclasses.replace(QUICK, clock="cpu")
    df = sweep.run(base, base, tmp_path, BenchConfig(backends=("torch",), batches=(1,), threads=1,
                                                     timing=timing, n_boot=200))
    slim = df[df["variant"] == "slim"].iloc[0]
    assert slim["flops_reduction"] == 1.0 and slim["clock"] == "cpu"
    assert slim["speedup_ci_low"] <= slim["speedup"] <= slim["speedup_ci_high"]


def test_cpu_clock_needs_one_cpu_thread() -> None:
    timing = dataclasses.replace(QUICK, clock="cpu")
    with pytest.raises(ValueError, match="threads=1"):
        BenchConfig(threads=2, timing=timing)
    with pytest.raises(ValueError, match="device cpu only"):
        BenchConfig(threads=1, devices=("cpu", "cuda"), timing=timing)
    with pytest.raises(ValueError, match="timing.clock"):
        TimingConfig(clock="sundial")


def test_registry_refuses_duplicates_and_lists_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("torch")(TorchBackend)
    with pytest.raises(KeyError, match="known: aoti, compile, ort, ort-trt, tensorrt, torch"):
        BACKENDS.get("onnxruntime")
    with pytest.raises(KeyError, match="unknown backend"):
        BenchConfig(backends=("nope",))


def test_backends_implement_the_interface() -> None:
    for name in BACKENDS.names():
        cls = BACKENDS.get(name)
        assert issubclass(cls, Backend) and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves methods abstract"


def test_cli_runs_and_refuses_to_overwrite(model_dirs: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base, slim = model_dirs
    out = tmp_path / "out"
    args = ["bench", "--base", str(base), "--slim", str(slim), "--backends", "torch", "--device", "cpu",
            "--precision", "fp32", "--batch", "1", "--out", str(out), "--warmup", "0", "--min-time",
            "0.05", "--rounds", "4", "--min-samples", "8", "--threads", "1"]
    assert main(args) == 0
    assert "speedup" in capsys.readouterr().out
    assert main(args) == 2  # results exist, no --force
    assert main(["bench", "--slim", str(slim), "--out", str(out)]) == 2  # --base missing
    assert main(["bench", "compare", str(out / "results.json"), "--baseline", str(out / "results.json")]) == 0


def test_int8_is_a_tensorrt_precision_only() -> None:
    opts = BackendOptions()
    for name in ("torch", "compile", "aoti", "ort", "ort-trt"):
        for device in BACKENDS.get(name).devices:
            reason = BACKENDS.get(name).unavailable(device, "int8", opts)
            assert reason and "does not support int8" in reason, (name, reason)
    trt_reason = BACKENDS.get("tensorrt").unavailable("cuda", "int8", opts)
    assert trt_reason is None or "does not support" not in trt_reason  # only CUDA/tensorrt can be missing
    with pytest.raises(ValueError, match="precision 'int4'"):
        BACKENDS.get("torch")(device="cpu", precision="int4")
