"""A stage's result depends only on its inputs and seed: not on which command or process ran it,
nor on whether it was interrupted and resumed.

Oracles are exact: the same bytes of weights, the same widths, the same accuracies.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import deploy_prune.train as train_mod
from deploy_prune.cli import main
from deploy_prune.config import DataConfig
from deploy_prune.data import TensorLoader, load_data, stage_loader
from deploy_prune.train import batches

TINY = """\
data: {name: digits, batch_size: 64}
model: {arch: small_vgg}
train: {epochs: 1, lr: 0.05}
scoring: {l1_lambda: 0.001, lr: 0.01, epochs: 0.5}
allocation: {flops_reduction: 2.0}
recovery: {epochs: 0.5, lr: 0.001, step_size: 1}
finetune: {epochs: 0.5, lr: 0.001}
threads: 1
"""


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def test_data_order_is_a_function_of_seed_stream_and_epoch():
    loader = load_data(DataConfig(name="digits", batch_size=64), seed=3).train
    assert isinstance(loader, TensorLoader)
    first = [y for _, y in batches(stage_loader(loader, "score"), 30)]
    for _ in range(3):  # plain iteration elsewhere (another stage) must not move it
        list(loader)
    again = [y for _, y in batches(stage_loader(loader, "score"), 30)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # resuming at step 25 gives exactly the uninterrupted tail (epoch 1, batch 4 onwards)
    tail = [y for _, y in batches(stage_loader(loader, "score"), 30, start=25)]
    assert all(torch.equal(a, b) for a, b in zip(first[25:], tail, strict=True))
    # another stage, or another epoch, has its own order
    other = [y for _, y in batches(stage_loader(loader, "recover"), 30)]
    assert not torch.equal(first[0], other[0])
    per_epoch = len(loader)
    assert not torch.equal(first[0], first[per_epoch])


def test_step_by_step_equals_run(tmp_path, tiny_yaml, capsys):
    """train -> score -> prune gives the base, scores and widths that run gives."""
    run_dir, ex = tmp_path / "run", tmp_path / "ex"
    assert main(["run", str(tiny_yaml), "--out", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run_dir / "report.json").read_text())
    md = (run_dir / "report.md").read_text()
    for node, w in report["widths"].items():  # the width table, printed and in report.md
        assert re.search(rf"^{re.escape(node)} +{w['base']} +{w['slim']} ", printed, re.M), node
        assert f"| {node} | {w['base']} | {w['slim']} |" in md
    top1 = f"slim {report['slim']['top1']:.2f}%"
    assert top1 in printed
    for cmd in (f"deploy-prune export {run_dir}/slim --format onnx", f"deploy-prune bench --base {run_dir}/base"):
        assert cmd in printed and cmd in md
    # --resume on a finished run (the README's form after scripts/run-default.sh) redoes nothing
    mtime = (run_dir / "slim" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(tiny_yaml), "--out", str(run_dir), "--resume"]) == 0
    assert top1 in capsys.readouterr().out
    assert (run_dir / "slim" / "model.safetensors").stat().st_mtime_ns == mtime
    assert main(["train", "--config", str(tiny_yaml), "--out", str(ex / "base")]) == 0
    assert_same_weights(run_dir / "base", ex / "base")
    assert main(["score", str(ex / "base"), "--out", str(ex / "scores.json")]) == 0
    a = json.loads((run_dir / "scores.json").read_text())
    b = json.loads((ex / "scores.json").read_text())
    assert a["channel_scores"] == b["channel_scores"]
    assert main(["prune", str(ex / "base"), "--scores", str(ex / "scores.json"), "--target-flops", "2.0",
                 "--out", str(ex / "slim")]) == 0
    pa = json.loads((run_dir / "pruned" / "plan.json").read_text())
    pb = json.loads((ex / "slim" / "plan.json").read_text())
    assert pa["kept"] == pb["kept"] and pa["widths"] == pb["widths"]
    assert_same_weights(run_dir / "pruned", ex / "slim")


class Interrupt(Exception):
    """Stands in for a kill: raised from the training loop's test hook."""


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_yaml, monkeypatch):
    """Interrupt once inside every training stage (between checkpoints), resume, compare."""
    from deploy_prune.config import load_config
    from deploy_prune.run import run

    cfg = load_config(tiny_yaml)
    whole = run(cfg, tmp_path / "whole")

    out = tmp_path / "pieces"
    stops = [("train", 7), ("score", 4), ("recover[kl]", 6), ("finetune", 5)]
    seen: list[tuple[str, float]] = []

    def hook(desc: str, step: int) -> None:
        if stops and (desc, step) == stops[0]:
            stops.pop(0)
            raise Interrupt(desc)

    monkeypatch.setattr(train_mod, "stop_hook", hook)
    for attempt in range(5):
        try:
            resumed = run(cfg, out, resume=attempt > 0)
            break
        except Interrupt as e:
            stage = {"train": "base", "score": "score", "recover[kl]": "recover", "finetune": "finetune"}[str(e)]
            ck = torch.load(out / "ckpt" / f"{stage}.pt", weights_only=True)
            assert 0 < ck["step"] < stops_steps(stage)  # a mid-stage checkpoint, not the stage's end
            seen.append((stage, float(ck["seconds"])))
    assert not stops and len(seen) == 4
    for key in ("base", "pruned", "recovered", "slim"):
        assert resumed[key]["top1"] == whole[key]["top1"], key
        assert resumed[key]["top5"] == whole[key]["top5"], key
    assert resumed["widths"] == whole["widths"]
    for d in ("base", "pruned", "recovered", "slim"):
        assert_same_weights(tmp_path / "whole" / d, out / d)
    # seconds add up over segments: each stage counts at least the interrupted segment's time
    for stage, before in seen:
        assert resumed["seconds"][stage] >= round(before, 2)


def stops_steps(stage: str) -> int:
    """Step counts of the tiny run's stages (digits: 1294 training images, batch 64: 21 steps)."""
    return {"base": 21, "score": 11, "recover": 11, "finetune": 11}[stage]


def test_summary_prints_a_measured_speed_when_the_report_has_one():
    from deploy_prune.run import render_report, summary_text

    r = {"base": {"arch": "small_vgg", "top1": 90.0, "top5": 99.0, "flops": 3e6, "params": 1e5},
         "pruned": {"top1": 50.0, "top5": 80.0}, "recovered": {"top1": 88.0, "top5": 98.0},
         "slim": {"top1": 89.0, "top5": 99.0, "flops": 1e6, "params": 4e4}, "flops_reduction": 3.0,
         "crucial_nodes": ["a"], "widths": {"a": {"base": 8, "slim": 8}, "b": {"base": 16, "slim": 4}},
         "seconds": {"base": 1.0}, "device": "cpu", "threads": 1}
    assert "measured speedup" not in summary_text(r, "out")
    r["speed"] = {"speedup": 1.87, "ci": [1.8, 1.9], "backend": "ort", "device": "cpu", "batch": 1}
    assert "measured speedup 1.87x [1.80, 1.90] (ort, cpu, batch 1)" in summary_text(r, "out")
    assert "Measured speedup 1.87x" in render_report(r, "out")
    assert "b                                    16      4   25.0%" in summary_text(r, "out")


def test_stages_start_where_their_predecessors_end_on_the_data_stream():
    """configs/default.yaml: 4 training epochs, 0.5 of scoring (a 5th pass), 3 of recovery."""
    from deploy_prune.config import load_config
    from deploy_prune.pipeline import first_epochs

    class Loader:  # 54,000 training images in batches of 128
        def __len__(self):
            return 422

    cfg = load_config("configs/default.yaml")
    assert first_epochs(cfg, Loader(), trained=True) == {"base": 0, "score": 4, "recover": 5, "finetune": 8}
    assert first_epochs(cfg, Loader(), trained=False)["score"] == 0
