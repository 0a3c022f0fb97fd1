"""Usage: python docs/results/peers_vgg16/base_check.py runs/peers_vgg16 0,1,2 <the study's overrides, without --set>.

Base convergence check: the peers' own recovery (2 epochs CE, SGD lr 0.01 cosine, from the
point of the stream where the peers start) applied to the UNPRUNED base. If the base gains
from it, the peers' rows partly measure base training."""
import copy
import json
import sys
import time
from pathlib import Path

from bench.studies import peers
from deploy_prune import pipeline
from deploy_prune.artifacts import load_model_dir
from deploy_prune.data import load_data, stage_loader
from deploy_prune.train import evaluate

out, seeds, sets = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], [a for a in sys.argv[3:] if a.strip()]
study = peers.Study(config="configs/default.yaml", overrides=sets)
for seed in seeds:
    cfg = peers.seed_config(study, seed)
    dev = pipeline.setup(cfg)
    data = load_data(cfg.data, seed=seed)
    model, plan = load_model_dir(out / f"seed{seed}" / "base")
    first = pipeline.first_epochs(cfg, data.train, trained=pipeline.trained_here(plan))
    pipeline.seed_stage(seed, "tp-finetune")
    loader = stage_loader(data.train, first_epoch=first["score"])
    m = copy.deepcopy(model)
    t0 = time.process_time()
    peers.ce_finetune(m, loader, peers.budget(cfg)["total"], dev)
    top1 = evaluate(m.to(dev), data.test, dev)["top1"]
    print(json.dumps({"seed": seed, "base_top1": plan.info["metrics"]["top1"], "base_plus_peer_finetune_top1": top1,
                      "epochs": peers.budget(cfg)["total"], "cpu_seconds": time.process_time() - t0}), flush=True)
