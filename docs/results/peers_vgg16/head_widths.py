"""Usage: python docs/results/peers_vgg16/head_widths.py <the study's overrides, without --set>.

Per dp row: the MLP head's hidden units the default prune keeps (prune only, same base/scores)."""
import json
import sys
from pathlib import Path

from torch import nn

from bench.studies import peers
from deploy_prune import pipeline
from deploy_prune.artifacts import load_model_dir

out = Path("runs/peers_vgg16")
sets = [a for a in sys.argv[1:] if a.strip()]
study = peers.Study(config="configs/default.yaml", overrides=sets)
for seed in (0, 1, 2):
    model, plan = load_model_dir(out / f"seed{seed}" / "base")
    sp = out / f"seed{seed}" / "scores.json"
    scores = pipeline.scores_from(json.loads(sp.read_text()), plan, source=sp)
    for target in (1.25, 1.5, 2.0, 3.0):
        cfg = peers.seed_config(study, seed, (*peers.METHODS["dp-stage-kd"].overrides,
                                              f"allocation.flops_reduction={target}", "allocation.target=flops"))
        pipeline.setup(cfg)
        r = pipeline.prune(model, plan, cfg, scores)
        lin = [m for m in r.slim.classifier if isinstance(m, nn.Linear)]
        convs = [m.out_channels for m in r.slim.modules() if isinstance(m, nn.Conv2d)]
        print(json.dumps({"seed": seed, "target": target, "head_hidden_kept": lin[0].out_features,
                          "head_hidden_base": 256, "conv_widths": convs}), flush=True)
