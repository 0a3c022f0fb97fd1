"""``deploy-prune bench`` options are declared once: the report's command line reproduces the run."""

import argparse
import shlex

import pytest

from bench import cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench")
    cli.add_run_options(p)
    return p


@pytest.mark.parametrize("extra", [
    [],
    ["--threads", "1", "--clock", "cpu", "--channels-last", "--accuracy", "--name", "my model"],
    ["--max-eval-samples", "100", "--batch", "1", "32", "--precision", "fp16", "--device", "cuda"],
    ["--warmup-iters", "3", "--confidence", "0.9", "--bootstrap", "50", "--data-root", "/d", "--seed", "7"],
    ["--compile-mode", "max-autotune", "--backends", "compile", "--threads", "0", "--force"],
])
def test_command_line_reproduces_every_option(extra):
    p = _parser()
    args = p.parse_args(["--base", "b", "--slim", "s", "--out", "o", *extra])
    line = cli.command_line(args)
    words = shlex.split(line)
    assert words[:2] == ["deploy-prune", "bench"]
    again = p.parse_args(words[2:])
    assert {k: v for k, v in vars(again).items() if k != "force"} == \
        {k: v for k, v in vars(args).items() if k != "force"}
    assert "--force" not in words  # a reproduction must not overwrite by accident
    assert cli.config_from_args(again) == cli.config_from_args(args)


def test_defaults_give_the_documented_command():
    args = _parser().parse_args(["--base", "b", "--slim", "s", "--out", "o"])
    assert cli.command_line(args) == (
        "deploy-prune bench --base b --slim s --backends torch ort --device cpu --precision fp32 "
        "--batch 1 8 --out o --warmup 0.5 --min-time 2.0 --rounds 30 --min-samples 200 --seed 0")


def test_every_timing_option_reaches_the_timing_config():
    args = _parser().parse_args(["--warmup", "0.25", "--warmup-iters", "4", "--min-time", "1.5",
                                 "--rounds", "6", "--min-samples", "12", "--clock", "cpu"])
    t = cli.timing_from_args(args)
    assert (t.warmup_s, t.warmup_iters, t.min_time_s, t.rounds, t.min_samples, t.clock) == \
        (0.25, 4, 1.5, 6, 12, "cpu")
