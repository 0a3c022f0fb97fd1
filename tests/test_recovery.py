"""Mimic losses against hand computations; recovery does its job; resume works."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import digits_cfg, random_plan
from deploy_prune.allocation import cut
from deploy_prune.data import load_data
from deploy_prune.models import build_model
from deploy_prune.nodes import discover, last_node
from deploy_prune.recovery import MIMIC_LOSSES
from deploy_prune.recovery.mimic import RecoveryError, classifier_modules, mimic_loss_fn, recover
from deploy_prune.run import run
from deploy_prune.train import train_baseline


def _maps(seed=0, shape=(2, 5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g)), torch.relu(torch.randn(shape, generator=g))


@pytest.mark.parametrize("name", MIMIC_LOSSES.names())
def test_identical_maps_cost_nothing(name):
    a, _ = _maps()
    assert MIMIC_LOSSES.get(name)()(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_matches_float64_reference():
    a, b = _maps(1)
    p = np.exp(a.double().numpy())
    p /= p.sum(1, keepdims=True)  # softmax over channels
    q = np.exp(b.double().numpy())
    q /= q.sum(1, keepdims=True)
    ref = (p * (np.log(p) - np.log(q))).sum(1).mean()  # mean over batch and positions
    got = MIMIC_LOSSES.get("kl")()(a, b).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_js_symmetric_and_bounded():
    a, b = _maps(2)
    js = MIMIC_LOSSES.get("js")()
    assert js(a, b).item() == pytest.approx(js(b, a).item(), rel=1e-6)
    far_a = torch.zeros(1, 2, 1, 1)
    far_a[0, 0] = 50.0
    far_b = torch.zeros(1, 2, 1, 1)
    far_b[0, 1] = 50.0
    assert 0 < js(far_a, far_b).item() <= math.log(2) + 1e-6
    assert js(far_a, far_b).item() == pytest.approx(math.log(2), rel=1e-3)


def test_mse_and_lasso_by_hand():
    a, b = _maps(3)
    assert MIMIC_LOSSES.get("mse")()(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert MIMIC_LOSSES.get("lasso")()(a, b).item() == pytest.approx((a - b).abs().mean().item(), rel=1e-6)


def _pair():
    cfg = digits_cfg()
    data = load_data(cfg.data, seed=0)
    teacher = build_model("small_vgg", num_classes=10, in_channels=1)
    train_baseline(teacher, data.train, cfg.train, device=torch.device("cpu"))
    teacher.eval()
    x = torch.zeros(1, 1, 8, 8)
    nodes = discover(teacher, x)
    last = last_node(nodes)
    crucial = [nodes[-2].name, last.name]
    plan = {k: v for k, v in random_plan(nodes, frac=0.5).items() if k not in crucial}
    student = cut(teacher, plan, x)
    return cfg, data, teacher, student, nodes, discover(student, x), crucial


def test_kl_refuses_bad_node_sets():
    cfg, data, teacher, student, tn, sn, crucial = _pair()
    with pytest.raises(RecoveryError, match="at least 2"):
        recover(teacher, student, teacher_nodes=tn, student_nodes=sn, names=[crucial[-1]],
                loader=data.train, cfg=cfg.recovery, device=torch.device("cpu"))
    with pytest.raises(RecoveryError, match="last conv node"):
        recover(teacher, student, teacher_nodes=tn, student_nodes=sn, names=[tn[0].name, crucial[0]],
                loader=data.train, cfg=cfg.recovery, device=torch.device("cpu"))


def test_recovery_lowers_mimic_loss_and_keeps_frozen_parts():
    cfg, data, teacher, student, tn, sn, crucial = _pair()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    head_before = [p.clone() for m in classifier_modules(student) for p in m.parameters()]
    xb, yb = next(iter(data.val))
    fn = mimic_loss_fn(teacher, [n for n in tn if n.name in crucial], MIMIC_LOSSES.get("kl")())
    student.eval()
    before = fn(student, xb, yb).item()
    cfg.recovery.epochs = 3
    recover(teacher, student, teacher_nodes=tn, student_nodes=sn, names=crucial, loader=data.train,
            cfg=cfg.recovery, device=torch.device("cpu"))
    student.eval()
    with torch.no_grad():
        after = fn(student, xb, yb).item()
    assert after < 0.8 * before
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    head_after = [p for m in classifier_modules(student) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(head_before, head_after))


def test_run_writes_report_and_resumes(tmp_path, monkeypatch):
    cfg = digits_cfg(train__epochs=2, recovery__epochs=1, finetune__epochs=2)
    out = tmp_path / "run"
    import deploy_prune.run as run_mod

    real_save = run_mod.Checkpointer.save
    calls = {"n": 0}

    def crash_in_finetune(self, step):
        real_save(self, step)
        if self.path.name == "finetune.pt" and step == self.every * 2:
            calls["n"] += 1
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(run_mod.Checkpointer, "save", crash_in_finetune)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out)
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"base", "score", "prune", "recover"}
    ck = torch.load(out / "ckpt" / "finetune.pt", weights_only=True)
    assert ck["step"] > 0 and ck["optimizer"]["state"]
    base_mtime = (out / "base" / "model.safetensors").stat().st_mtime_ns

    resumed = {}
    real_restore = run_mod.Checkpointer.restore

    def spy_restore(self):
        ok = real_restore(self)
        state = copy.deepcopy(self.state.optimizer.state_dict()["state"])  # before training moves it
        resumed[self.path.name] = (ok, self.state.start, state)
        return ok

    monkeypatch.setattr(run_mod.Checkpointer, "save", real_save)
    monkeypatch.setattr(run_mod.Checkpointer, "restore", spy_restore)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, out)
    report = run(cfg, out, resume=True)
    ok, start, opt_state = resumed["finetune.pt"]
    assert ok and start == ck["step"]
    torch.testing.assert_close(opt_state[0]["exp_avg"], ck["optimizer"]["state"][0]["exp_avg"])
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == base_mtime  # not redone
    for key in ("top1", "flops", "params"):
        assert key in report["base"] and key in report["slim"]
    for key in ("flops_reduction", "crucial_nodes", "widths", "seconds"):
        assert key in report
    assert "top1" in report["pruned"] and "top1" in report["recovered"]
    assert (out / "report.md").read_text().startswith("# deploy-prune run")
    with pytest.raises(ValueError, match="different config"):
        run(digits_cfg(train__epochs=5), out, resume=True)
