"""The peer study and the recipe options it measures (crucial.select, recovery.ce/kd_weight)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bench.studies import peers
from deploy_prune.allocation import AllocationError, select_crucial
from deploy_prune.config import FinetuneConfig, load_config
from deploy_prune.models import build_model
from deploy_prune.nodes import discover, stage_of, stem_of
from deploy_prune.recovery.losses import KLMimic
from deploy_prune.recovery.mimic import RecoveryError, finetune_state, mimic_loss_fn
from deploy_prune.run import Runner


def _vgg():
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    example = torch.zeros(1, 1, 28, 28)
    return model, discover(model, example), example


def test_stages_follow_the_spatial_size():
    model, nodes, example = _vgg()
    st = stage_of(model, nodes, example)
    assert st["features.0"] == st["features.3"] == (28, 28)
    assert st["features.7"] == st["features.10"] == (14, 14)
    assert st["features.18"] == (4, 4)
    assert len(set(st.values())) == 4


def test_per_stage_crucial_never_takes_two_nodes_of_one_stage():
    model, nodes, example = _vgg()
    # the two full-resolution nodes score highest: the OSPR rule takes both (the fragile case)
    ns = {"features.0": 5.0, "features.3": 4.0, "features.7": 1.0, "features.10": 3.0,
          "features.14": 2.0, "features.18": 0.5}
    scores = {n.name: np.full(n.channels, ns[n.name]) for n in nodes}
    assert select_crucial(nodes, scores, n=2) == ["features.0", "features.3", "features.18"]
    got = select_crucial(nodes, scores, n=2, select="per_stage", stages=stage_of(model, nodes, example))
    assert got == ["features.0", "features.10", "features.18"]
    with pytest.raises(AllocationError, match="crucial.select"):
        select_crucial(nodes, scores, n=2, select="best", stages={})


def test_per_stage_crucial_passes_over_the_stem():
    model, nodes, example = _vgg()
    stem = stem_of(model, nodes, example)
    assert stem == "features.0"
    ns = {"features.0": 5.0, "features.3": 4.0, "features.7": 1.0, "features.10": 3.0,
          "features.14": 2.0, "features.18": 0.5}
    scores = {n.name: np.full(n.channels, ns[n.name]) for n in nodes}
    stages = stage_of(model, nodes, example)
    # the stem's stage is still chosen from, through its next-best node
    assert select_crucial(nodes, scores, n=2, select="per_stage", stages=stages, stem=stem) == \
        ["features.3", "features.10", "features.18"]
    # a net whose only candidate is the stem still gets its N nodes
    only = [n for n in nodes if n.name in ("features.0", "features.18")]
    two = {k: scores[k] for k in ("features.0", "features.18")}
    assert select_crucial(only, two, n=2, select="per_stage", stages=stages, stem=stem) == \
        ["features.0", "features.18"]


def test_per_stage_takes_each_stages_cheapest_node_that_fits():
    model, nodes, example = _vgg()
    ns = {"features.0": 1.02, "features.3": 1.01, "features.7": 1.03, "features.10": 1.00,
          "features.14": 0.99, "features.18": 0.98}
    scores = {n.name: np.full(n.channels, ns[n.name]) for n in nodes}
    stages = stage_of(model, nodes, example)
    costs = {"features.0": 0.05, "features.3": 0.3, "features.7": 0.45, "features.10": 0.17, "features.14": 0.2,
             "features.18": 0.0}
    asked = []

    def cost(k, whole=()):
        asked.append((k, tuple(whole)))
        if k == "features.7" and "features.3" in whole:
            return 0.9  # its conv reads features.3: both sides whole
        return costs[k]

    pick = dict(n=2, select="per_stage", stages=stages, stem="features.0")
    # by score alone: features.7 (best by 1%) for its stage, although it costs 0.45 of the budget
    assert select_crucial(nodes, scores, **pick) == ["features.3", "features.7", "features.18"]
    # with costs: the cheaper node of that stage; the stem stays out although it is cheapest
    assert select_crucial(nodes, scores, **pick, cost=cost) == ["features.3", "features.10", "features.18"]
    # the full-resolution stage is filled first, and the next stage's nodes are costed beside it
    assert asked[0] == ("features.3", ()) and ("features.7", ("features.3",)) in asked
    assert not any(k == "features.14" for k, _ in asked)  # only the chosen stages are costed

    # a node with which the set can no longer reach the target is never taken: its stage goes
    # to the next stage by score
    def tight(k, whole=()):
        return math.inf if k in ("features.7", "features.10") and whole else cost(k, whole)

    assert select_crucial(nodes, scores, **pick, cost=tight) == ["features.3", "features.14", "features.18"]
    # the OSPR rule (select=score) keeps the score order, passing over what does not fit
    assert select_crucial(nodes, scores, n=2, cost=cost) == ["features.0", "features.7", "features.18"]
    assert select_crucial(nodes, scores, n=2, cost=lambda k, whole=(): math.inf if whole else 0.1) == \
        ["features.7", "features.18"]
    # nothing fits: the score order, for the allocation to refuse in its own words
    assert select_crucial(nodes, scores, **pick, cost=lambda k, whole=(): math.inf) == \
        ["features.3", "features.7", "features.18"]


def test_whole_cost_is_what_keeping_a_node_whole_adds_to_the_slim_model():
    from deploy_prune.allocation import allocate, whole_cost
    from deploy_prune.config import AllocationConfig
    from deploy_prune.flops import count

    model, nodes, example = _vgg()
    scores = {n.name: np.linspace(0.1, 1.0, n.channels) for n in nodes}
    cfg = AllocationConfig(flops_reduction=3.0, round_to=1)
    cost = whole_cost(model, nodes, scores, example, keep=["features.18"], cfg=cfg)
    ref = allocate(model, nodes, scores, example, crucial=["features.18"], cfg=cfg)
    budget = count(model, example).flops / 3.0
    assert cost("features.18") == 0.0  # already whole
    for name in ("features.3", "features.7", "features.14"):
        slim = allocate(model, nodes, scores, example, crucial=["features.18"], cfg=cfg)
        assert slim.counts[name] < next(n.channels for n in nodes if n.name == name)
        assert cost(name) > 0
    # one node kept whole at the natural widths of the rest: exactly the FLOPs its full width adds
    from deploy_prune.allocation import cut, keep_top

    full = {**ref.counts, "features.7": 64}
    f7 = count(cut(model, keep_top(scores, full), example, nodes=nodes), example).flops
    assert cost("features.7") == pytest.approx((f7 - ref.flops) / budget)
    # joint: with its input node features.3 whole too, features.7's conv costs both its sides
    assert cost("features.7", ("features.3",)) > cost("features.7")
    # a set that leaves too little to cut cannot reach the target: infinite
    assert math.isinf(cost("features.14", ("features.3", "features.7", "features.10")))
    # only whether it fits (select=score): 0 or infinite, with no allocation to measure shares on
    fits = whole_cost(model, nodes, scores, example, keep=["features.18"], cfg=cfg, marginal=False)
    assert fits("features.7") == 0.0 and fits("features.7", ("features.3",)) == 0.0
    assert math.isinf(fits("features.14", ("features.3", "features.7", "features.10")))
    assert whole_cost(model, nodes, scores, example, keep=["features.18"],
                      cfg=AllocationConfig(target="channels")) is None


def test_stem_is_the_node_of_the_first_conv_that_runs():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10).eval()
    ex = torch.zeros(1, 3, 64, 64)
    nodes = discover(m, ex)
    stem = stem_of(m, nodes, ex)
    assert "conv1" in next(n for n in nodes if n.name == stem).producers  # layer1's stream carries conv1
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    assert stem_of(m, discover(m, ex), ex) == "features.0.0"


def test_recovery_adds_task_and_distillation_terms():
    torch.manual_seed(0)
    teacher, nodes, _ = _vgg()
    student, _, _ = _vgg()  # other random weights
    mimic = [n for n in nodes if n.name in ("features.10", "features.18")]
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    plain = mimic_loss_fn(teacher, mimic, KLMimic())(student, x, y)
    with torch.no_grad():
        t, s = teacher(x), student(x)
    ce = F.cross_entropy(s, y)
    kd = 16.0 * F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
    both = mimic_loss_fn(teacher, mimic, KLMimic(), ce_weight=0.5, kd_weight=2.0)(student, x, y)
    assert math.isclose(both.item(), (plain + 0.5 * ce + 2.0 * kd).item(), rel_tol=1e-5)
    # a student equal to its teacher has nothing to distil: only the task loss is left
    same = mimic_loss_fn(teacher, mimic, KLMimic(), ce_weight=1.0, kd_weight=3.0)(teacher, x, y)
    assert math.isclose(same.item(), F.cross_entropy(t, y).item(), rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(RecoveryError, match="kd_weight"):
        mimic_loss_fn(teacher, mimic, KLMimic(), kd_weight=-1.0)


def test_study_runs_the_default_config_as_it_is():
    """Nothing is pinned over the config: the widths' rounding is the product's default (auto)."""
    cfg = peers.seed_config(peers.Study(config="configs/default.yaml"), 3)
    default = load_config("configs/default.yaml", [])
    assert cfg.allocation.round_to == default.allocation.round_to == "auto"
    assert cfg.seed == 3
    assert (cfg.crucial, cfg.recovery, cfg.finetune) == (default.crucial, default.recovery, default.finetune)


def test_finetune_schedule_cosine_anneals_to_zero():
    model, _, _ = _vgg()
    loader = [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))] * 4
    const = finetune_state(model, loader, FinetuneConfig(epochs=2, lr=0.01, optimizer="sgd"))
    assert const.scheduler is None and const.steps == 8
    cos = finetune_state(model, loader, FinetuneConfig(epochs=2, lr=0.01, optimizer="sgd", schedule="cosine"))
    lrs = []
    for _ in range(cos.steps):
        lrs.append(cos.optimizer.param_groups[0]["lr"])
        cos.optimizer.step()
        cos.scheduler.step()
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert cos.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_frontier_interpolates_and_never_extrapolates():
    pts = [(1.0, 90.0), (2.0, 88.0), (3.0, 85.0)]
    assert peers.frontier_at(pts, 1.5) == pytest.approx(89.0)
    assert peers.frontier_at(pts, 2.5) == pytest.approx(86.5)
    assert peers.frontier_at(pts, 3.0) == pytest.approx(85.0)
    assert math.isnan(peers.frontier_at(pts, 3.2))  # never extrapolated past the fastest point
    assert peers.frontier_at(pts, 0.9) == pytest.approx(90.0)  # slower than the base: the base
    # a faster point that is also more accurate is what a user would take
    assert peers.frontier_at([(1.0, 90.0), (1.2, 89.0), (1.5, 89.8)], 1.1) == pytest.approx(89.8)


def test_equal_latency_compares_dp_with_each_peer_point_on_its_seed():
    rows = [dict(seed=0, base_top1=90.0, method="dp-ospr", kind="dp", target=2.0, ort_speedup=2.0, top1=88.0),
            dict(seed=0, base_top1=90.0, method="tp-l1", kind="tp", target=2.0, ort_speedup=1.5, top1=88.5),
            dict(seed=0, base_top1=90.0, method="tp-bn", kind="tp", target=3.0, ort_speedup=2.5, top1=80.0)]
    eq = peers.equal_latency(pd.DataFrame(rows))
    l1 = eq[eq.peer == "tp-l1"].iloc[0]
    assert l1.dp_top1_at_speedup == pytest.approx(89.0) and l1.delta == pytest.approx(0.5)
    assert math.isnan(eq[eq.peer == "tp-bn"].iloc[0].delta)  # dp's frontier stops at 2.0x


def test_study_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    sets = ["data.name=digits", "data.batch_size=64", "train.epochs=1", "scoring.epochs=0.25",
            "scoring.l1_lambda=0.001", "recovery.epochs=0.25", "finetune.epochs=0.25", "threads=1"]
    argv = ["--out", str(tmp_path / "p"), "--seeds", "0", "--targets", "2", "--no-timing",
            "--methods", "dp-ospr", "dp-stage-kd", "tp-l1", "tp-taylor"]
    for s in sets:
        argv += ["--set", s]
    assert peers.main(argv) == 0
    df = pd.read_csv(tmp_path / "p" / "peers.csv")
    assert sorted(df.method) == ["dp-ospr", "dp-stage-kd", "tp-l1", "tp-taylor"]
    assert df.flops_reduction.between(1.9, 2.1).all()  # every method pruned to the same target
    assert df.top1.between(0, 100).all() and not df.top1.isna().any()
    tp_epochs = df[df.method == "tp-l1"].epochs.iloc[0]
    assert tp_epochs == pytest.approx(0.75)  # the peers get scoring + recovery + fine-tuning epochs
    # each row says how its widths were rounded: dp as the config does it (default: the CPU's
    # channel block, finer only when the target is out of reach), the peers exact (round_to=None)
    for _, r in df.iterrows():
        widths = [int(w) for w in str(r.widths).split()]
        assert r.round_to in ((16, 8, 4, 2, 1) if r.method.startswith("dp") else (1,))
        assert all(w % r.round_to == 0 for w in widths), (r.method, r.round_to, widths)
    # the study's dp row is what `deploy-prune run` gives from the same config and seed
    stage_kd = peers.METHODS["dp-stage-kd"].overrides
    cfg = load_config("configs/default.yaml", [*sets, "seed=0", *stage_kd, "allocation.flops_reduction=2.0",
                                               "allocation.target=flops", "speed_check.enabled=false"])
    report = Runner(cfg, tmp_path / "run").run()
    assert report["base"]["top1"] == pytest.approx(df.base_top1.iloc[0], abs=1e-3)
    assert report["slim"]["top1"] == pytest.approx(df[df.method == "dp-stage-kd"].top1.iloc[0], abs=1e-3)
    # resumed: nothing is re-run, the rows are the same
    assert peers.main(argv) == 0
    assert pd.read_csv(tmp_path / "p" / "peers.csv").equals(df)
    assert peers.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no study rows" in capsys.readouterr().err


def test_sgdft_ablation_changes_only_the_finetune_stage_of_the_default():
    """The ablation row is the default recipe with one change: fine-tuning's optimiser and schedule."""
    study = peers.Study(config="configs/default.yaml")
    base = peers.seed_config(study, 0, peers.METHODS["dp-stage-kd"].overrides)
    sgd = peers.seed_config(study, 0, peers.METHODS["dp-stage-kd-sgdft"].overrides)
    assert (sgd.finetune.optimizer, sgd.finetune.lr, sgd.finetune.schedule) == ("sgd", 0.01, "cosine")
    assert sgd.finetune.epochs == base.finetune.epochs
    assert (sgd.allocation, sgd.crucial, sgd.recovery, sgd.scoring) == \
        (base.allocation, base.crucial, base.recovery, base.scoring)


def test_every_dp_method_is_the_config_with_valid_overrides():
    """A misspelt key in a screened recipe would be a one-line config error mid-study: load each."""
    # the page's settings (docs/results/peers.md): dp-stage-kd-noft moves the page's 0.5
    # fine-tuning epoch into its 1.0 recovery epoch, so its budget is equal at that scale
    study = peers.Study(config="configs/default.yaml", overrides=[
        "data.max_train_samples=4000", "train.epochs=10", "scoring.epochs=0.5", "recovery.epochs=1.0",
        "finetune.epochs=0.5"])
    default = peers.seed_config(study, 0, peers.METHODS["dp-stage-kd"].overrides)
    for name, m in peers.METHODS.items():
        if m.kind != "dp":
            continue
        cfg = peers.seed_config(study, 0, m.overrides)
        # the budget of every recipe is the default's: the peers' epochs are computed from it
        assert peers.budget(cfg)["total"] == pytest.approx(peers.budget(default)["total"]), name
    assert peers.seed_config(study, 0, peers.METHODS["dp-stage-kd-noft"].overrides).finetune.epochs == 0


def test_prune_weighs_what_keeping_a_crucial_node_whole_costs():
    from deploy_prune import pipeline
    from deploy_prune.artifacts import ModelPlan
    from deploy_prune.config import RunConfig

    model, nodes, _ = _vgg()
    plan = ModelPlan("small_vgg", 10, 1, 28)
    # beta's margin between nodes of one stage: about 1% (features.7 over features.10)
    ns = {"features.0": 1.02, "features.3": 1.01, "features.7": 1.012, "features.10": 1.008,
          "features.14": 0.99, "features.18": 0.98}
    scores = {n.name: ns[n.name] * np.linspace(0.8, 1.2, n.channels) for n in nodes}
    cfg = RunConfig()
    cfg.crucial.select, cfg.allocation.flops_reduction, cfg.allocation.round_to = "per_stage", 3.0, 8
    costed = pipeline.prune(model, plan, cfg, scores)
    cfg.crucial.cost = False
    plain = pipeline.prune(model, plan, cfg, scores)
    assert plain.allocation.crucial == ["features.3", "features.7", "features.18"]
    assert costed.allocation.crucial == ["features.3", "features.10", "features.18"]
    # the cheaper crucial node leaves the rest of the network wider at the same FLOPs
    for res in (costed, plain):
        assert res.allocation.flops_reduction == pytest.approx(3.0, rel=0.05)
    others = lambda res: sum(v for k, v in res.allocation.counts.items() if k not in res.allocation.crucial)  # noqa: E731
    assert others(costed) > others(plain)
