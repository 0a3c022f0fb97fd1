"""Core sub-commands: run, train, score, prune, inspect (studies such as ablate are plugins)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deploy_prune import distributed, pipeline, speed
from deploy_prune.artifacts import (
    atomic_write_text,
    check_output,
    finite_json,
    load_model_dir,
    read_json_object,
    read_plan,
    save_model_dir,
)
from deploy_prune.config import load_config
from deploy_prune.data import load_data, stage_loader
from deploy_prune.nodes import discover
from deploy_prune.scoring import SCORERS
from deploy_prune.weights import read_state_dict


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML overrides of the defaults (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.epochs=1 data.max_train_samples=5000")
    p.add_argument("--data-root", metavar="DIR", help="where the dataset lives (same as data.root=DIR)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output (a directory only if deploy-prune created it)")


def job_args(p: argparse.ArgumentParser, *, config_optional: bool = False) -> None:
    """Options shared by the whole-job commands (run, ablate)."""
    if config_optional:
        p.add_argument("config_file", metavar="CONFIG", nargs="?",
                       help="YAML config (e.g. configs/default.yaml); optional with --base")
    else:
        p.add_argument("config_file", metavar="CONFIG", help="YAML config (e.g. configs/default.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--data-root", metavar="DIR", help="where the dataset lives (same as data.root=DIR)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted job in DIR")
    p.add_argument("--force", action="store_true",
                   help="delete DIR's previous content and start over (only a directory deploy-prune "
                   "created; checked after the config and data are validated)")


def overrides(args) -> list[str]:
    extra = [f"data.root={args.data_root}"] if getattr(args, "data_root", None) else []
    return list(args.overrides) + extra


def _allocation_flags(args) -> list[str]:
    """Overrides from the allocation flags shared by prune and run."""
    over = []
    if getattr(args, "target_flops", None) is not None:
        over += ["allocation.target=flops", f"allocation.flops_reduction={args.target_flops}"]
    if getattr(args, "keep_fraction", None) is not None:
        over += ["allocation.target=channels", f"allocation.keep_fraction={args.keep_fraction}"]
    if getattr(args, "target_speedup", None) is not None:
        over += ["allocation.target=speedup", f"allocation.speedup={args.target_speedup}"]
    if getattr(args, "round_to", None) is not None:
        over += [f"allocation.round_to={args.round_to}"]
    if getattr(args, "require_speedup", None) is not None:
        over += [f"speed_check.require_speedup={args.require_speedup}"]
    if getattr(args, "no_speed_check", False):
        over += ["speed_check.enabled=false"]
    return over


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 1, got {text!r}")
    return value


def allocation_args(p: argparse.ArgumentParser, *, channels: bool = True) -> None:
    p.add_argument("--target-flops", type=float, metavar="X", help="X times fewer FLOPs (e.g. 3.0)")
    if channels:
        p.add_argument("--keep-fraction", type=float, metavar="F", help="keep this fraction of prunable channels")
    p.add_argument("--target-speedup", type=float, metavar="X",
                   help="X times faster, measured on allocation.backend/device/batch (default ORT CPU "
                   "batch 1); slower to prune than a FLOPs target, but the widths fit the hardware")
    p.add_argument("--round-to", type=_round_to, metavar="M",
                   help="kept counts rounded to a multiple of M (default auto: 16 on AVX-512 CPUs, 8 on "
                   "AVX2 CPUs and GPUs, the channel blocks their kernels compute in, measured in "
                   "docs/results/rounding.md; 1 = exact widths)")
    p.add_argument("--require-speedup", type=float, metavar="X",
                   help="fail (exit 2) when the slim model measures less than X times faster than "
                   "its base (the slowdown guard; ORT CPU batch 1 by default)")
    p.add_argument("--no-speed-check", action="store_true",
                   help="skip the few-second speed measurement after pruning (speed_check.enabled=false)")


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


DATASETS = {"fashion-mnist": "fashion_mnist", "fashion_mnist": "fashion_mnist", "digits": "digits",
            "cifar10": "cifar10"}


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers (e.g. 0.485,0.456,0.406), got {text!r}") from None


def import_settings(args) -> list[str]:
    """The import options as config overrides: dataset, model and the model's preprocessing."""
    if args.data in DATASETS:
        over = [f"data.name={DATASETS[args.data]}"]
    else:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"--data: {args.data} is neither a folder (ImageFolder with train/ and val/) "
                                    f"nor a dataset name ({', '.join(DATASETS)})")
        over = ["data.name=imagefolder", f"data.root={Path(args.data).resolve()}"]
    over += [f"model.arch={args.arch}", f"model.weights={Path(args.weights).resolve()}", "train.epochs=0"]
    for flag, key in (("input_size", "image_size"), ("resize", "resize"), ("channels", "channels"),
                      ("interpolation", "interpolation")):
        if getattr(args, flag) is not None:
            over.append(f"data.{key}={getattr(args, flag)}")
    for flag in ("mean", "std"):
        if getattr(args, flag) is not None:
            over.append(f"data.{flag}={_floats(getattr(args, flag), '--' + flag)}")
    return over


def cmd_import(args) -> int:
    check_output(args.out, force=args.force)
    over = overrides(args) + import_settings(args)
    cfg = load_config(args.config, over)
    cfg = load_config(args.config, pipeline.import_overrides(cfg.model.arch, cfg.data) + over)
    device = pipeline.setup(cfg)
    state = read_state_dict(args.weights)  # a bad file fails before the data is read
    data = load_data(cfg.data, seed=cfg.seed)
    model, plan, metrics = pipeline.import_base(cfg, data, device, weights=args.weights, state=state,
                                                num_classes=args.num_classes)
    if not distributed.is_main():
        return 0
    save_model_dir(model, plan, args.out, force=args.force)
    p = plan.info["preprocess"]
    resize = f"resize {p['resize']}, crop {p['crop']}" if p["resize"] else f"resize to {p['input_size']}"
    print(f"imported {plan.arch} from {args.weights}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% "
          f"on {metrics['samples']} {data.name} test images; {plan.info['flops'] / 1e6:.2f} MFLOPs  "
          f"{plan.info['params'] / 1e6:.3f} M params -> {args.out}")
    print(f"preprocessing: {p['channels']}x{p['input_size']}x{p['input_size']}, {resize}, "
          f"mean {_fmt(p['mean'])}, std {_fmt(p['std'])}")
    return 0


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def cmd_score(args) -> int:
    out = check_output(args.out, force=args.force)
    model, plan = pipeline.load_base(args.base)
    cfg = pipeline.resolve_base_config(plan, args.config, overrides(args))
    device = pipeline.setup(cfg)
    result = _scores(args, model, plan, cfg, device)
    if not distributed.is_main():
        return 0
    atomic_write_text(out, finite_json(result, what=str(out)))
    top = sorted(result["node_scores"].items(), key=lambda kv: -kv[1])[:5]
    print(f"{result['scorer']} scores for {len(result['nodes'])} nodes in {result['seconds']:.1f}s -> {out}")
    print("top nodes: " + ", ".join(f"{k} ({v:.3f})" for k, v in top))
    return 0


def cmd_prune(args) -> int:
    check_output(args.out, force=args.force)
    model, plan = pipeline.load_base(args.base)
    over = overrides(args) + _allocation_flags(args)
    cfg = pipeline.resolve_base_config(plan, args.config, over)
    device = pipeline.setup(cfg)
    if args.scores:
        data = read_json_object(args.scores, finite=True, max_bytes=256 << 20)  # read_scored's reading
        scores, decision = pipeline.scored(data, plan, source=args.scores, model=model)
        scorer = data.get("scorer")
    else:
        scores, decision = pipeline.scored(_scores(args, model, plan, cfg, device), plan, source="scorer")
        scorer = args.scorer
    res = pipeline.prune(model, plan, cfg, scores, decision=decision,
                         scorer=scorer if isinstance(scorer, str) else None)
    if not distributed.is_main():
        return 0
    check = speed.speed_check(model, plan, res.slim, res.plan, cfg)
    if check is not None:
        res.plan.info["speed_check"] = check
    save_model_dir(res.slim, res.plan, args.out, force=args.force)
    info = res.plan.info
    print(pipeline.width_table(res.nodes, info["base_widths"], info["widths"], info["crucial_nodes"]))
    print(f"FLOPs {info['base_flops'] / 1e6:.2f}M -> {info['flops'] / 1e6:.2f}M "
          f"({info['flops_reduction']:.3f}x fewer), params {info['base_params'] / 1e6:.3f}M -> "
          f"{info['params'] / 1e6:.3f}M -> {args.out}")
    print(speed.summary_line(check))
    speed.enforce(check, cfg, where=str(args.out))
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
    if plan.info.get("preprocess"):
        p = plan.info["preprocess"]
        resize = f"resize {p['resize']}, crop {p['crop']}" if p["resize"] else f"resize to {p['input_size']}"
        print(f"preprocessing: {resize}, {p['channels']} channels, mean {_fmt(p['mean'])}, std {_fmt(p['std'])}")
    print(f"{'node':<32} {'channels':>8} {'MFLOPs':>9} {'params':>9}")
    for r in rows:
        print(f"{r['node']:<32} {r['channels']:>8} {r['flops'] / 1e6:>9.3f} {r['params']:>9}")
    return 0


def cmd_run(args) -> int:
    from deploy_prune.run import run, summary_text

    if args.config_file and "=" in args.config_file and not Path(args.config_file).is_file():
        args.overrides = [args.config_file, *args.overrides]  # ``run --base DIR key=value``: no CONFIG
        args.config_file = None
    if args.base:  # the base directory's own data and model settings; the config only overrides
        cfg = pipeline.resolve_base_config(read_plan(args.base), args.config_file, overrides(args) + _allocation_flags(args))
    elif not args.config_file:
        raise ValueError("run needs a CONFIG file, or --base DIR to prune an existing model directory")
    else:
        cfg = load_config(args.config_file, overrides(args) + _allocation_flags(args))
    report = run(cfg, args.out, resume=args.resume, force=args.force, base_dir=args.base)
    if not distributed.is_main():  # rank 0 owns the outputs and speaks for the job
        return 0
    print(summary_text(report, args.out))
    speed.enforce(report.get("speed_check"), cfg, where=f"{args.out}/slim")
    return 0


def cmd_recover(args) -> int:
    from deploy_prune.recovery.mimic import finetune
    from deploy_prune.run import recover_slim
    from deploy_prune.train import evaluate

    check_output(args.out, force=args.force)
    teacher, base_plan = load_model_dir(args.base)
    student, plan = load_model_dir(args.slim)
    if not plan.kept:
        raise ValueError(f"{args.slim}: not a pruned model directory (its plan keeps every channel)")
    if plan.info.get("base_sha256", base_plan.digest()) != base_plan.digest():
        raise ValueError(f"{args.slim} was not pruned from {args.base} (base hash differs)")
    cfg = pipeline.resolve_base_config(plan, args.config, overrides(args))
    device = pipeline.setup(cfg)
    data = load_data(cfg.data, seed=cfg.seed)
    before = evaluate(student, data.test, device)
    # the training stream from where run's recovery and fine-tuning would read it
    first = pipeline.first_epochs(cfg, data.train, trained=pipeline.trained_here(base_plan))
    pipeline.seed_stage(cfg.seed, "recover")
    loader = stage_loader(data.train, batch_size=cfg.recovery.batch_size, first_epoch=first["recover"])
    student, info = recover_slim(teacher, student, plan, cfg, loader, device)
    if args.finetune and cfg.finetune.epochs > 0:
        pipeline.seed_stage(cfg.seed, "finetune")
        finetune(student, loader=stage_loader(data.train, first_epoch=first["finetune"]), cfg=cfg.finetune,
                 device=device)
        student.cpu().eval()
    after = evaluate(student, data.test, device)
    student.cpu()
    if not distributed.is_main():
        return 0
    plan.info.update(recovery=info, metrics=after, finetuned=bool(args.finetune and cfg.finetune.epochs > 0))
    save_model_dir(student, plan, args.out, force=args.force)
    print(f"recovered {plan.arch} ({info['mode']}, {info['loss']}): top-1 {before['top1']:.2f}% -> "
          f"{after['top1']:.2f}% on {after['samples']} {data.name} test images -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole job: train -> score -> prune -> recover -> fine-tune",
                       description="Train (or load with --base) a baseline, score channels, choose "
                       "crucial nodes, prune globally to the target, cut channels out, recover in one "
                       "step by mimicking the crucial feature maps, fine-tune and evaluate. Writes "
                       "DIR/base, DIR/slim, DIR/report.json and DIR/report.md.")
    job_args(p, config_optional=True)
    p.add_argument("--base", metavar="BASE_DIR", help="use this trained (or imported) model directory instead "
                   "of training; its data and preprocessing are used, CONFIG is optional and only overrides")
    allocation_args(p, channels=False)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("import", help="turn your own trained model (architecture + weights) into a base directory",
                       description="Build ARCH, load your weights file (.safetensors, a .pth/.pt "
                       "state_dict, a checkpoint dict; module./_orig_mod. prefixes are stripped), "
                       "evaluate it on DATA with the model's own preprocessing and write a base model "
                       "directory (plan.json + model.safetensors) for run/score/prune/export/bench. "
                       "The preprocessing is stored with the model and used by every later stage.")
    common(p)
    p.add_argument("--arch", required=True, help="registered name (small_vgg, resnet20, ...), tv.NAME for "
                   "any torchvision classifier (tv.resnet18, tv.mobilenet_v2) or timm.NAME for any "
                   "timm model (timm.resnet26d; needs pip install timm)")
    p.add_argument("--weights", required=True, metavar="FILE", help="the trained weights")
    p.add_argument("--data", required=True, metavar="DIR|NAME", help="ImageFolder root with train/ and val/ "
                   f"class folders, or one of: {', '.join(DATASETS)}")
    p.add_argument("--out", required=True, metavar="BASE_DIR", help="model directory to write")
    p.add_argument("--num-classes", type=int, metavar="N", help="classifier outputs (default: the data's classes)")
    g = p.add_argument_group("the model's preprocessing (default: torchvision's ImageNet recipe for tv.* "
                             "models, the pretrained_cfg's for timm.* models, the dataset's own otherwise)")
    g.add_argument("--input-size", type=int, metavar="S", help="side of the square input (crop size)")
    g.add_argument("--resize", type=int, metavar="R", help="shorter side before the centre crop "
                   "(tv.* default: S*256/224; timm.*: S/crop_pct); 0: resize the whole image to SxS, no crop")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize filter "
                   "(default bilinear)")
    g.add_argument("--mean", metavar="M[,M,M]", help="per-channel mean on [0,1] pixels")
    g.add_argument("--std", metavar="S[,S,S]", help="per-channel std")
    g.add_argument("--channels", type=int, choices=(1, 3), help="input channels (grayscale is repeated to 3)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("recover", help="recover an existing slim directory against its base",
                       description="Mimic the base model's crucial feature maps (recovery.* settings, "
                       "default: one-step KL) on the slim model's training data and write the recovered "
                       "slim directory. Data and preprocessing come from the slim directory's plan.")
    p.add_argument("slim", metavar="SLIM_DIR", help="a pruned model directory (from prune or run)")
    common(p)
    p.add_argument("--base", required=True, metavar="BASE_DIR", help="the model it was pruned from (the teacher)")
    p.add_argument("--out", required=True, metavar="DIR", help="recovered model directory to write")
    p.add_argument("--finetune", action="store_true", help="then fine-tune with cross-entropy (finetune.*)")
    p.set_defaults(func=cmd_recover)

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
    allocation_args(p)
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
