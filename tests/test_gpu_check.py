"""scripts/gpu-check.sh cannot rot: its budget logic and summary (fast), its steps in-process
(fast), and the whole dry run on this CPU machine (slow): every step runs, every CUDA row is a
skipped row naming why, at most 8 files come back, no deeper than one folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["install", "env", "pair", "paper", "pytest", "env-after"]
OUT_FILES = {"summary.tsv", "log.txt", "env.json", "pair.csv", "pair.md", "resnet50.csv", "resnet50.md",
             "pytest.txt"}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args: list[str], out: Path, tmp: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPUCHECK_WORK": str(tmp / "work"), "OUT": ""}
    return subprocess.run(["bash", str(SCRIPT), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.tsv", sep="\t", keep_default_na=False)


@needs_bash
def test_no_step_starts_past_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(["--dry-run", "--budget", "0"], out, tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    s = _summary(out)
    assert s["step"].tolist() == STEPS
    assert s.loc[0, "status"] == "skipped" and "dry run" in s.loc[0, "note"]
    assert (s["status"].iloc[1:] == "not started").all() and s["note"].iloc[1:].str.contains("budget").all()
    assert "step" in res.stdout.splitlines()[-len(STEPS) - 1]  # the table is the last thing printed
    assert set(os.listdir(out)) <= OUT_FILES


@needs_bash
def test_steps_runs_only_the_named_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(["--dry-run", "--steps", "env", "--budget", "300"], out, tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    s = _summary(out).set_index("step")
    assert s.loc["env", "status"] == "ok" and (out / "env.json").is_file()
    assert (s.drop(["install", "env"])["note"] == "not in --steps").all()


@needs_bash
def test_bad_argument_is_one_line(tmp_path: Path) -> None:
    res = _run(["--bogus"], tmp_path / "out", tmp_path, timeout=30)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--bogus" in res.stderr


def test_env_step_writes_both_readings(tmp_path: Path) -> None:
    drv = _driver()
    assert drv.main(["env", "--out", str(tmp_path), "--dry-run"]) == 0
    assert drv.main(["env", "--after", "--out", str(tmp_path), "--dry-run"]) == 0
    data = json.loads((tmp_path / "env.json").read_text())
    assert set(data) == {"before", "after"}
    for reading in data.values():
        assert reading["versions"]["torch"] == torch.__version__
        if not torch.cuda.is_available():
            assert reading["cuda_available"] is False
        if shutil.which("nvidia-smi") is None:
            assert reading["nvidia_smi"].startswith("skipped: nvidia-smi not found")


def test_the_planned_gpu_runs_are_the_issue_s() -> None:
    drv = _driver()
    runs = dict(drv._pair_runs(dry_run=False))
    assert set(runs) == {"eager", "compile-cudagraphs", "aoti"}
    assert runs["eager"]["precisions"] == ("fp32", "fp16") and runs["eager"]["batches"] == (1, 256)
    assert runs["compile-cudagraphs"]["compile_mode"] == "reduce-overhead"
    assert all(r["devices"] == ("cuda",) for r in runs.values())
    stages = drv.paper_stages(dry_run=False)
    assert [s["backends"] for s in stages] == [["torch"], ["compile"]]
    assert all(s["batches"] == [1, 32] and s["channels_last"] and s["precisions"] == ["fp16"] for s in stages)
    cfg = drv._paper_config(False, stages)
    assert cfg.points[0].arch == "resnet50" and cfg.points[0].flops_reduction == 2.8 and cfg.input_size == 224


@pytest.mark.slow
@needs_bash
def test_dry_run_completes_every_step_with_cuda_rows_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(["--dry-run", "--budget", "900"], out, tmp_path, timeout=1200)
    assert res.returncode == 0, res.stderr
    s = _summary(out)
    assert s["step"].tolist() == STEPS
    assert s.set_index("step")["status"].drop("install").eq("ok").all(), s.to_string()
    assert set(os.listdir(out)) == OUT_FILES and all((out / f).is_file() for f in OUT_FILES)
    for name in ("pair.csv", "resnet50.csv"):
        df = pd.read_csv(out / name)
        cuda = df[df["device"] == "cuda"]
        if not torch.cuda.is_available():
            assert len(cuda) and set(cuda["status"]) == {"skipped"}
            assert cuda["error"].str.contains("CUDA").all()
        cpu = df[df["device"] == "cpu"]
        assert len(cpu) and set(cpu["status"]) == {"ok"}  # the timing path itself ran
    assert "passed" in (out / "pytest.txt").read_text() or "skipped" in (out / "pytest.txt").read_text()
    assert "step" in res.stdout and "pair" in res.stdout.splitlines()[-4]
