"""``deploy-prune export MODEL_DIR --format onnx|tensorrt|aoti --out PATH [options]``.

Registered through the ``deploy_prune.commands`` entry point. Options a format does not take
are refused with a one-line error rather than silently ignored.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deploy_prune.cli import CLIError
from deploy_prune.precision import PRECISIONS
from export.errors import BackendUnavailableError
from export.formats import FORMATS, check_options, export_model_dir

# option name -> its flag, for error messages about options that do not apply
_FLAGS = {"opset": "--opset", "dynamic_batch": "--static-batch", "simplify": "--simplify",
          "verify": "--no-verify", "rtol": "--rtol", "atol": "--atol", "precision": "--precision",
          "min_batch": "--min-batch", "opt_batch": "--opt-batch", "max_batch": "--max-batch",
          "workspace_gb": "--workspace-gb", "timing_cache": "--timing-cache",
          "calib_batches": "--calib-batches", "calib_batch_size": "--calib-batch-size",
          "device": "--device", "batch": "--batch"}


def cmd_export(args: argparse.Namespace) -> int:
    opts = {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}
    opts["force"] = args.force
    try:
        check_options(args.format, opts)
    except TypeError:
        bad = sorted(_FLAGS[k] for k in opts if k not in FORMATS.get(args.format).options)
        raise CLIError(f"option(s) {', '.join(bad)} do not apply to --format {args.format}") from None
    t0 = time.perf_counter()
    try:
        out = export_model_dir(args.model_dir, args.format, args.out, **opts)
    except BackendUnavailableError as e:
        raise CLIError(str(e)) from None
    from export.onnx_files import onnx_files

    files = onnx_files(out) if args.format == "onnx" else [out]
    size = sum(f.stat().st_size for f in files) / 1e6
    extra = "".join(f" + {f.name}" for f in files[1:])  # the external-data file travels with it
    print(f"{args.format}: {args.model_dir} -> {out}{extra} ({size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    if args.format == "onnx" and opts.get("verify", True) is not False:
        line = real_input_agreement(args.model_dir, out)
        if line:
            print(line)
    return 0


def real_input_agreement(model_dir: str | Path, onnx_path: Path) -> str | None:
    """Top-1 agreement of the ONNX file with PyTorch on the model's own test data, when the
    plan names a dataset that is on this machine (None otherwise); ParityError below 99%."""
    import logging

    import torch

    from deploy_prune.artifacts import load_model_dir
    from deploy_prune.config import RunConfig, from_dict
    from deploy_prune.data import load_data
    from export.parity import top1_agreement
    from export.to_onnx import open_session

    model, plan = load_model_dir(model_dir)
    config = plan.info.get("config")
    if not config:
        return None
    try:
        cfg = from_dict(RunConfig, config)
        data = load_data(cfg.data, seed=cfg.seed)
    except (OSError, ValueError) as e:  # the dataset is not here: random-probe parity only
        logging.getLogger(__name__).info("no real inputs for a top-1 check (%s)", e)
        return None
    session = open_session(Path(onnx_path))
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    frac, n = top1_agreement(run, model.eval(), data.test, what=f"ONNX Runtime on {Path(onnx_path).name}")
    return f"top-1 agreement with PyTorch on {n} {data.name} test images: {100 * frac:.1f}%"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    p = sub.add_parser(
        "export", help="export a model directory to ONNX, a TensorRT engine or an AOTInductor package",
        description="Export MODEL_DIR (plan.json + model.safetensors) to --out. The artifact is "
        "written under a temporary name and renamed only after it matched the PyTorch model at "
        "batch 1 and 7 (ONNX Runtime, AOTInductor, TensorRT on the GPU).",
        epilog="Options default per format: ONNX opset 18, dynamic batch, fp32; TensorRT fp16, batch "
        "1/8/128, 4 GB workspace; AOTInductor cpu, batch up to 256.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--format", required=True, choices=FORMATS.names(), help="artifact to write")
    p.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="output file (.onnx, .engine, .pt2 for aoti)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _common_options(p.add_argument_group("verification and batch (all formats)"))
    _onnx_options(p.add_argument_group("ONNX (also the graph TensorRT builds from)"))
    _trt_options(p.add_argument_group("TensorRT"))
    aoti = p.add_argument_group("AOTInductor")
    aoti.add_argument("--device", default=argparse.SUPPRESS, help="cpu or cuda[:N] (default cpu)")
    p.set_defaults(func=cmd_export)


def _common_options(p: argparse._ArgumentGroup) -> None:
    S = argparse.SUPPRESS  # only options given on the command line reach the exporter
    p.add_argument("--no-verify", dest="verify", action="store_false", default=S,
                   help="skip the parity check (the artifact is then unverified)")
    p.add_argument("--rtol", type=float, default=S, help="parity relative tolerance")
    p.add_argument("--atol", type=float, default=S, help="parity absolute tolerance")
    p.add_argument("--max-batch", type=int, default=S,
                   help="largest batch (tensorrt profile, default 128; aoti, default 256)")


def _onnx_options(p: argparse._ArgumentGroup) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--opset", type=int, default=S, help="ONNX opset (default 18)")
    p.add_argument("--static-batch", dest="dynamic_batch", action="store_false", default=S,
                   help="onnx/aoti: fix the batch axis (to --batch) instead of leaving it dynamic")
    p.add_argument("--batch", type=int, default=S, help="onnx/aoti with --static-batch: the batch size (1)")
    p.add_argument("--simplify", action="store_true", default=S, help="onnx: simplify with onnxslim")


def _trt_options(p: argparse._ArgumentGroup) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--precision", choices=PRECISIONS, default=S,
                   help="tensorrt: engine precision (default fp16); onnx: fp32 (default) or fp16, "
                   "fp16 weights and compute behind fp32 input/output, the graph TensorRT 11 "
                   "builds fp16 engines from")
    p.add_argument("--min-batch", type=int, default=S, help="tensorrt profile minimum batch (1)")
    p.add_argument("--opt-batch", type=int, default=S, help="tensorrt profile batch to tune for (8)")
    p.add_argument("--workspace-gb", type=float, default=S, help="tensorrt workspace limit (4.0)")
    p.add_argument("--timing-cache", type=Path, default=S, metavar="FILE",
                   help="tensorrt timing cache, read if present and written back")
    p.add_argument("--calib-batches", type=int, default=S, help="int8: calibration batches (16)")
    p.add_argument("--calib-batch-size", type=int, default=S, help="int8: calibration batch size (32)")
