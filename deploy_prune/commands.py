"""Core sub-commands: run, train, score, prune, inspect (studies such as ablate are plugins)."""

from __future__ import annotations

import argparse
import json
import sys

from deploy_prune import distributed, pipeline
from deploy_prune.artifacts import atomic_write_text, check_output, load_model_dir, save_model_dir
from deploy_prune.config import load_config
from deploy_prune.data import load_data
from deploy_prune.nodes import discover
from deploy_prune.scoring import SCORERS


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML overrides of the defaults (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.epochs=1 data.max_train_samples=5000")
    p.add_argument("--data-root", metavar="DIR", help="where the dataset lives (same as data.root=DIR)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def job_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the whole-job commands (run, ablate)."""
    p.add_argument("config_file", metavar="CONFIG", help="YAML config (e.g. configs/default.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--data-root", metavar="DIR", help="where the dataset lives (same as data.root=DIR)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job in DIR")
    p.add_argument("--force", action="store_true", help="delete DIR's previous content and start over")


def overrides(args) -> list[str]:
    extra = [f"data.root={args.data_root}"] if getattr(args, "data_root", None) else []
    return list(args.overrides) + extra


def cmd_train(args) -> int:
    check_output(args.out, force=args.force)
    cfg = load_config(args.config, overrides(args))
    device = pipeline.setup(cfg)
    data = load_data(cfg.data, seed=cfg.seed)
    model, plan, metrics = pipeline.train_base(cfg, data, device)
    if not distributed.is_main():
        return 0
    save_model_dir(model, plan, args.out, force=args.force)
    print(f"baseline {cfg.model.arch} on {data.name}: top1 {metrics['top1']:.2f}%  "
          f"top5 {metrics['top5']:.2f}%  {plan.info['flops'] / 1e6:.2f} MFLOPs  "
          f"{plan.info['params'] / 1e6:.3f} M params -> {args.out}")
    return 0


def _scores(args, model, plan, cfg, device):
    data = load_data(cfg.data, seed=cfg.seed) if SCORERS.get(args.scorer or cfg.scoring.method).needs_data else None
    return pipeline.score(model, plan, cfg, data, device, method=args.scorer)


def cmd_score(args) -> int:
    out = check_output(args.out, force=args.force)
    model, plan = pipeline.load_base(args.base)
    cfg = pipeline.resolve_config(plan, args.config, overrides(args))
    device = pipeline.setup(cfg)
    result = _scores(args, model, plan, cfg, device)
    if not distributed.is_main():
        return 0
    atomic_write_text(out, json.dumps(result, indent=1))
    top = sorted(result["node_scores"].items(), key=lambda kv: -kv[1])[:5]
    print(f"{result['scorer']} scores for {len(result['nodes'])} nodes in {result['seconds']:.1f}s -> {out}")
    print("top nodes: " + ", ".join(f"{k} ({v:.3f})" for k, v in top))
    return 0


def cmd_prune(args) -> int:
    check_output(args.out, force=args.force)
    model, plan = pipeline.load_base(args.base)
    over = overrides(args)
    if args.target_flops is not None:
        over += ["allocation.target=flops", f"allocation.flops_reduction={args.target_flops}"]
    if args.keep_fraction is not None:
        over += ["allocation.target=channels", f"allocation.keep_fraction={args.keep_fraction}"]
    if args.round_to is not None:
        over += [f"allocation.round_to={args.round_to}"]
    cfg = pipeline.resolve_config(plan, args.config, over)
    device = pipeline.setup(cfg)
    if args.scores:
        scores, decision = pipeline.read_scored(args.scores, plan)
    else:
        scores, decision = pipeline.scored(_scores(args, model, plan, cfg, device), plan, source="scorer")
    res = pipeline.prune(model, plan, cfg, scores, decision=decision)
    if not distributed.is_main():
        return 0
    save_model_dir(res.slim, res.plan, args.out, force=args.force)
    info = res.plan.info
    print(pipeline.width_table(res.nodes, info["base_widths"], info["widths"], info["crucial_nodes"]))
    print(f"FLOPs {info['base_flops'] / 1e6:.2f}M -> {info['flops'] / 1e6:.2f}M "
          f"({info['flops_reduction']:.3f}x fewer), params {info['base_params'] / 1e6:.3f}M -> "
          f"{info['params'] / 1e6:.3f}M -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    model, plan = load_model_dir(args.dir)
    example = plan.example()
    nodes = discover(model, example)
    d = pipeline.describe(model, plan, nodes)
    from deploy_prune.flops import count

    per_module = count(model, example).per_module
    modules = dict(model.named_modules())
    rows = []
    for n in nodes:
        fl = sum(per_module.get(p, 0) for p in n.producers)
        pa = sum(p.numel() for name in n.producers for p in modules[name].parameters())
        rows.append({"node": n.name, "channels": n.channels, "flops": fl, "params": pa,
                     "junction": n.is_junction, "prunable": n.prunable})
    d.update(arch=plan.arch, pruned=bool(plan.kept), nodes=rows, plan_sha256=plan.digest(),
             crucial_nodes=plan.info.get("crucial_nodes"), metrics=plan.info.get("metrics"))
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.dir}: {plan.arch} ({'slim' if plan.kept else 'base'}), input "
          f"{plan.in_channels}x{plan.input_size}x{plan.input_size}, {d['flops'] / 1e6:.2f} MFLOPs, "
          f"{d['params'] / 1e6:.3f} M params")
    print(f"{'node':<32} {'channels':>8} {'MFLOPs':>9} {'params':>9}")
    for r in rows:
        print(f"{r['node']:<32} {r['channels']:>8} {r['flops'] / 1e6:>9.3f} {r['params']:>9}")
    return 0


def cmd_run(args) -> int:
    from deploy_prune.run import run, summary_text

    cfg = load_config(args.config_file, overrides(args))
    report = run(cfg, args.out, resume=args.resume, force=args.force, base_dir=args.base)
    if not distributed.is_main():  # rank 0 owns the outputs and speaks for the job
        return 0
    print(summary_text(report, args.out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole job: train -> score -> prune -> recover -> fine-tune",
                       description="Train (or load with --base) a baseline, score channels, choose "
                       "crucial nodes, prune globally to the target, cut channels out, recover in one "
                       "step by mimicking the crucial feature maps, fine-tune and evaluate. Writes "
                       "DIR/base, DIR/slim, DIR/report.json and DIR/report.md.")
    job_args(p)
    p.add_argument("--base", metavar="BASE_DIR", help="use this trained model directory instead of training")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a baseline and save it as a model directory",
                       description="Train a baseline per the config and write OUT/plan.json + "
                       "OUT/model.safetensors.")
    common(p)
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score every channel of a model (beta by default)",
                       description="Learn channel importance on the training data and write "
                       "channel and node scores as JSON.")
    p.add_argument("base", metavar="BASE_DIR", help="model directory to score")
    common(p)
    p.add_argument("--out", required=True, metavar="SCORES.json")
    p.add_argument("--scorer", choices=SCORERS.names(), help="scorer (default: scoring.method)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="prune globally to a FLOPs or channel target and cut channels out",
                       description="Choose crucial nodes, rank the other nodes' channels together "
                       "and remove the lowest until the target is met; write the slim model "
                       "directory and print the per-layer width table.")
    p.add_argument("base", metavar="BASE_DIR")
    common(p)
    p.add_argument("--out", required=True, metavar="SLIM_DIR")
    p.add_argument("--target-flops", type=float, metavar="X", help="X times fewer FLOPs (e.g. 3.0)")
    p.add_argument("--keep-fraction", type=float, metavar="F", help="keep this fraction of prunable channels")
    p.add_argument("--round-to", type=int, metavar="M", help="round kept counts to a multiple (8 for tensor cores)")
    p.add_argument("--scores", metavar="SCORES.json", help="precomputed scores (default: score first)")
    p.add_argument("--scorer", choices=SCORERS.names(), help="scorer when no --scores are given")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("inspect", help="per-node channels, FLOPs and params of a model directory",
                       description="Print the architecture, input shape, FLOPs and parameters of a "
                       "model directory (base or slim), then one row per prunable node: channels, "
                       "MFLOPs and parameters of the layers that produce it. Reads plan.json and "
                       "model.safetensors; trains nothing.",
                       epilog="Example: deploy-prune inspect runs/default/slim --json")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
