"""The ablation table: every requested row is filled, identical experiments are shared."""

import pandas as pd

from bench.studies.ablation import ablate, variants
from conftest import digits_cfg


def test_variants_cover_the_paper_studies():
    names = {(v.study, v.name) for v in variants(3, ("selection", "loss", "nodes", "pipeline", "scorer"))}
    for row in [("selection", "random"), ("selection", "first_k"), ("selection", "l1"), ("loss", "js"),
                ("loss", "ce"), ("nodes", "mse_last_1"), ("nodes", "mse_last_3"), ("pipeline", "layerwise"),
                ("scorer", "rbp")]:
        assert row in names


def test_ablation_table_is_filled(tmp_path):
    cfg = digits_cfg(train__epochs=2, recovery__epochs=0.5, finetune__epochs=0.5)
    rows = ablate(cfg, tmp_path / "abl", studies=("loss", "nodes", "pipeline"))
    df = pd.read_csv(tmp_path / "abl" / "ablation.csv")
    n = int((df.study == "nodes").sum())  # one row per number of mimicked crucial nodes, 1..N
    assert n >= 2 and len(df) == len(rows) == 5 + n + 2
    cols = ["pruned_top1", "recovered_top1", "finetuned_top1", "flops_reduction", "seconds", "recovery_epochs"]
    assert not df[cols].isna().any().any()
    assert (tmp_path / "abl" / "ablation.md").is_file() and (tmp_path / "abl" / "ablation.png").stat().st_size > 0
    # MSE on all crucial nodes is one experiment under two labels: run once, reported twice
    mse = df[(df.study == "loss") & (df.variant == "mse")].iloc[0]
    last = df[(df.study == "nodes") & (df.variant == f"mse_last_{n}")].iloc[0]
    assert mse.finetuned_top1 == last.finetuned_top1 and mse.seconds == last.seconds
    # layer-by-layer cuts one node at a time, each with its own recovery
    lw = df[df.variant == "layerwise"].iloc[0]
    assert lw.recovery_epochs > df[df.variant == "one_step"].iloc[0].recovery_epochs
