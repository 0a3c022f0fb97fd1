"""The ``deploy-prune`` command line.

Core sub-commands live here; ``export`` and ``bench`` are plugins found through the
``deploy_prune.commands`` entry-point group, so the core never imports the later stages.
Every command takes ``--config FILE`` and dotted ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from typing import NoReturn

from deploy_prune import commands, distributed

log = logging.getLogger("deploy_prune")


class CLIError(Exception):
    """An error to print as one line and exit with status 2."""


def _plugins(sub: argparse._SubParsersAction) -> None:
    for ep in entry_points(group="deploy_prune.commands"):
        try:
            register = ep.load()
        except ImportError as e:  # a broken optional stage must not break the core CLI
            log.debug("command plugin %s unavailable: %s", ep.name, e)
            continue
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deploy-prune",
        description="Prune a trained CNN with learned channel importance (beta or RBP), cut the "
        "channels out for real, recover it in one step by mimicking the original's crucial "
        "feature maps, export it (ONNX, TensorRT, AOTInductor) and measure the speedup.",
        epilog="Run 'deploy-prune COMMAND --help' for each command's options. Overrides are "
        "dotted keys, e.g. train.epochs=1 data.max_train_samples=5000.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(sub)
    _plugins(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (``run CONFIG --out DIR train.epochs=1``): argparse leaves
    # such trailing positionals unparsed, so collect key=value items from what it did not know
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    _config_as_positional(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the exporters' own INFO chatter drowns the useful lines (parity reports)
        for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._inductor"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    code = 1  # an exception mapped to no exit code below (a bug) still counts as a failure
    try:
        code = _dispatch(args)
        return code
    finally:
        distributed.shutdown(ok=code == 0)


def _config_as_positional(args: argparse.Namespace) -> None:
    """``train configs/x.yaml --out DIR`` as ``run configs/x.yaml`` takes it: one YAML path among
    the overrides of a command with ``--config`` is that config file."""
    over = getattr(args, "overrides", None) or []
    yamls = [x for x in over if "=" not in x and x.lower().endswith((".yaml", ".yml"))]
    if len(yamls) == 1 and hasattr(args, "config") and args.config is None:
        args.config = yamls[0]
        args.overrides = [x for x in over if x != yamls[0]]


def _dispatch(args: argparse.Namespace) -> int:
    """Run the sub-command; expected errors become one line on stderr and exit code 2."""
    try:
        distributed.init_from_env()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, TypeError, MemoryError) as e:
        # OSError: a read-only or full disk, a permission; MemoryError: an input asking for too much
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.strerror:  # raised by the OS: "No space left on device: PATH"
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        msg = " ".join(str(msg).split())  # always one line
        print(f"deploy-prune {args.command}: error: {msg}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The ``deploy-prune`` console command: ``main`` and exit with its code.

    Under torchrun the worker leaves with ``os._exit`` once its output is flushed and the process
    group is destroyed. Importing ``torch._dynamo`` after ``init_process_group`` (``torch.optim``
    does) keeps the gloo group's worker threads alive past ``destroy_process_group``; at
    interpreter teardown they free their last work items, need the GIL, and abort the rank
    (SIGABRT, ``terminate called without an active exception``): seen in 2 of 20 two-rank runs
    here and once in CI. Everything the command writes is already renamed into place by then.
    """
    code = main()
    if distributed.launched():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
