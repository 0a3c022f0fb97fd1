"""Two gloo processes on CPU give the single-process result within tolerance."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deploy_prune import distributed
from deploy_prune.artifacts import ModelPlan, save_model_dir
from deploy_prune.models import build_model


def _score(base, out, nproc: int) -> dict:
    args = ["score", str(base), "--out", str(out), "data.name=digits", "data.batch_size=64",
            "scoring.epochs=2", "scoring.lr=0.01", "scoring.l1_lambda=0.001", "threads=1"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "deploy_prune.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "deploy_prune.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    # torchrun's summary box hides why a rank died; put the ranks' own error lines first
    why = [ln for ln in proc.stderr.splitlines()
           if any(w in ln for w in ("what()", "terminate called", "Error", "error:", "Fatal"))]
    assert proc.returncode == 0, "\n".join(why[:20]) + "\n...\n" + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_ranks_match_one_process(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    base = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 8), tmp_path / "base")
    one = _score(base, tmp_path / "one.json", 1)
    two = _score(base, tmp_path / "two.json", 2)
    assert one["channel_scores"].keys() == two["channel_scores"].keys()
    moved = 0.0
    for k, v in one["channel_scores"].items():
        np.testing.assert_allclose(two["channel_scores"][k], v, atol=2e-4, rtol=0)
        moved = max(moved, float(np.abs(np.asarray(v) - 1.0).max()))
    assert moved > 1e-3  # the betas did train, so the match is not trivial


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_shutdown_leaves_the_process_group(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    torch.distributed.init_process_group("gloo")
    assert torch.distributed.is_initialized()
    distributed.shutdown(ok=True)
    assert not torch.distributed.is_initialized()
    distributed.shutdown(ok=False)  # a second call (or one without a group) is a no-op


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_fail_cleanly_with_the_commands_own_error(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    base = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 8), tmp_path / "base")
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deploy_prune.cli", "score", str(base), "--out", str(taken), "data.name=digits", "threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert f"output {taken} already exists" in proc.stderr
    # the ranks exit with the command's code 2, not killed by a signal at teardown
    assert "exitcode: 2" in proc.stderr.replace("exitcode  :", "exitcode:"), proc.stderr[-2000:]
    assert "SIGABRT" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert taken.read_text() == "{}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_from_main_gives_every_rank_rank0s_result(tmp_path):
    # what a measured allocation relies on: each rank would time its own widths, rank 0's win
    script = tmp_path / "probe.py"
    script.write_text(
        "import os\n"
        "from deploy_prune import distributed\n"
        "distributed.init_from_env()\n"
        "got = distributed.from_main(lambda: {'rank': distributed.rank(), 'widths': [distributed.rank() + 1]})\n"
        "print('RESULT', os.environ['RANK'], got['rank'], got['widths'][0], flush=True)\n"
        "distributed.shutdown(ok=True)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted(ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert results == [["0", "0", "1"], ["1", "0", "1"]]
