"""Every command in the README's bash blocks runs as printed, in the state the README describes.

The commands run unchanged, in order, from a scratch copy of the repository's inputs (configs,
baselines, scripts) where set-up is already done. The README's full budget takes an hour on two
cores, so ``configs/default.yaml`` in the scratch copy is the same job at a tiny budget (data caps,
fractions of an epoch); the CI block (``runs/ci``) is already small and runs on the real config,
against the committed baseline. The worked example runs in the fast suite; the whole README in
``-m slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

TINY_DEFAULT = """\
# configs/default.yaml at a test budget: the same job, tiny data and fractions of an epoch
data: {name: fashion_mnist, max_train_samples: 1024, max_eval_samples: 500}
model: {arch: small_vgg}
train: {epochs: 1, lr: 0.05}
scoring: {method: beta, l1_lambda: 0.0005, lr: 0.01, epochs: 0.5}
crucial: {n: 2, select: per_stage}
allocation: {target: flops, flops_reduction: 3.0}
recovery: {mode: onestep, loss: kl, ce_weight: 1.0, kd_weight: 1.0, epochs: 0.5, lr: 0.001, step_size: 2}
finetune: {epochs: 0.25, lr: 0.0001}
"""

# Commands the tests do not run, and why. Everything else in the README's bash blocks runs.
SKIP = {
    "bash scripts/test.sh": "the test suite itself (CI runs it: .ci/run)",
    "deploy-prune bench suite configs/bench/paper_claims.yaml": "hours of measurements; "
    "its tables are checked against the committed CSV by tests/test_results.py",
    "python -m bench.studies.peers": "the peer study: about 12 minutes of CPU per seed at the page's "
    "budget, hours for its seeds; tests/test_peers.py runs the same study code at a tiny budget",
}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comment-only lines (shown output) dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_commands() -> list[str]:
    return [c for b in bash_blocks(README.read_text()) for c in commands(b)]


def skipped(cmd: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)


def workspace(root: Path, *, tiny: bool) -> Path:
    """A scratch copy of what the README's commands read, set up (setup.sh does nothing)."""
    ws = root / ("tiny" if tiny else "real")
    for d in ("configs", "bench/baselines", "scripts", "docs/results", "examples"):
        shutil.copytree(REPO / d, ws / d)
    (ws / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\n# set-up already done\n")
    if tiny:
        (ws / "configs" / "default.yaml").write_text(TINY_DEFAULT)
    return ws


def run_in(ws: Path, cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, f"README command failed in {ws}:\n$ {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_readme_commands_parse_and_each_is_run_or_named_as_skipped():
    cmds = readme_commands()
    assert any(c.startswith("deploy-prune run configs/default.yaml --out runs/default") for c in cmds)
    assert any("bench compare" in c for c in cmds)
    for cmd in cmds:
        assert cmd.split()[0] in {"bash", "deploy-prune", "python", "python3"}, cmd
    for prefix in SKIP:  # a skip entry that matches nothing is stale
        assert any(c.startswith(prefix) for c in cmds), prefix


def test_worked_example_runs_as_printed(tmp_path):
    block = next(b for b in bash_blocks(README.read_text()) if "deploy-prune train --config" in b)
    ws = workspace(tmp_path, tiny=True)
    outs = [run_in(ws, cmd).stdout for cmd in commands(block)]
    assert "FLOPs" in outs[2] and "crucial" in outs[2]  # prune prints the width table
    assert (ws / "runs" / "ex" / "slim" / "plan.json").is_file()


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(tmp_path):
    tiny, real = workspace(tmp_path, tiny=True), workspace(tmp_path, tiny=False)
    for cmd in readme_commands():
        if skipped(cmd):
            continue
        run_in(real if "runs/ci" in cmd else tiny, cmd)


def docs_deploy_prune_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``deploy-prune`` line in the bash blocks of README and docs."""
    out = []
    for path in [README, *sorted((REPO / "docs").rglob("*.md"))]:
        for block in bash_blocks(path.read_text()):
            for cmd in commands(block):
                if cmd.startswith("deploy-prune "):
                    out.append((str(path.relative_to(REPO)), cmd.split("  #")[0].split(" # ")[0]))
    return out


@pytest.mark.parametrize("where,cmd", docs_deploy_prune_commands(),
                         ids=[f"{w}:{i}" for i, (w, _) in enumerate(docs_deploy_prune_commands())])
def test_every_documented_command_parses_as_printed(where, cmd):
    """Every documented deploy-prune command is accepted by the CLI parser exactly as printed
    (options, positionals, key=value overrides), so no page shows an argument form that fails."""
    import shlex

    from deploy_prune.cli import build_parser

    argv = shlex.split(cmd)[1:]
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: '{cmd}' is rejected by the parser (exit {e.code})")
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    assert not bad, f"{where}: '{cmd}': unrecognized {bad}"
    assert not extra or hasattr(args, "overrides"), f"{where}: '{cmd}' passes key=value to a command without overrides"
