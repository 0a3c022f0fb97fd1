"""Bad inputs and faults (issue 13): one line on stderr and exit 2, nothing of the user's deleted,
nothing half-written, nothing non-finite saved. Each test is a row of docs/reliability.md."""

from __future__ import annotations

import errno
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune import cli
from deploy_prune.artifacts import (
    MARKER_FILE,
    ArtifactError,
    ModelPlan,
    NonFiniteError,
    OutputLock,
    check_removable,
    load_model_dir,
    open_job_dir,
    save_model_dir,
)
from deploy_prune.config import ConfigError, load_config
from deploy_prune.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "data.max_train_samples=128", "data.max_eval_samples=64", "threads=1"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    """The one error line (progress-bar carriage returns and log lines aside)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def expect_error(capsys, pattern: str, *argv: str) -> str:
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    line = error_line(err)
    assert re.search(pattern, line), line
    return line


# ---------------------------------------------------------------------------------------------
# config validation at load (deliverable 2)

BAD_VALUES = [
    ("train.lr=nan", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.epochs=-1", "train.epochs"),
    ("data.max_train_samples=0", "data.max_train_samples"),
    ("data.max_eval_samples=-3", "data.max_eval_samples"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("scoring.batch_size=0", "scoring.batch_size"),
    ("recovery.batch_size=0", "recovery.batch_size"),
    ("scoring.lr=nan", "scoring.lr"),
    ("recovery.lr=-0.1", "recovery.lr"),
    ("finetune.lr=0", "finetune.lr"),
    ("finetune.epochs=-2", "finetune.epochs"),
    ("recovery.epochs=nan", "recovery.epochs"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("allocation.flops_reduction=0.5", "allocation.flops_reduction"),
    ("allocation.keep_fraction=0", "allocation.keep_fraction"),
    ("allocation.round_to=0", "allocation.round_to"),
    ("crucial.n=1", "crucial.n"),
    ("threads=0", "threads"),
    ("device=gpu", "device"),
    ("recovery.loss=kll", "recovery.loss"),
    ("recovery.mode=onestpe", "recovery.mode"),
    ("allocation.target=flop", "allocation.target"),
    ("allocation.method=globl", "allocation.method"),
    ("data.name=mnist", "data.name"),
    ("scoring.method=bta", "scoring.method"),
    ("model.arch=vgg17", "model.arch"),
    ("train.optimizer=sgdd", "train.optimizer"),
    ("train.schedule=cos", "train.schedule"),
    ("finetune.optimizer=adamw", "finetune.optimizer"),
    ("finetune.schedule=step", "finetune.schedule"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_config_rejects_bad_value(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(ROOT / "configs" / "default.yaml", [override])


def test_every_committed_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_cli_bad_value_fails_before_any_work(capsys, tmp_path):
    out = tmp_path / "o"
    expect_error(capsys, r"recovery\.loss", "run", ROOT / "configs" / "default.yaml", "--out", out,
                 "recovery.loss=kll")
    assert not out.exists()  # refused at load: not after the base training


def test_train_takes_its_config_as_run_does(capsys, tmp_path):
    # ``train CONFIG`` (as ``run CONFIG``) reads the file: its bad key is the error, not "CONFIG is
    # not of the form key=value"
    bad = tmp_path / "mine.yaml"
    bad.write_text("train: {epochs: -1}\n")
    expect_error(capsys, r"train\.epochs", "train", bad, "--out", tmp_path / "o")
    expect_error(capsys, r"recovery\.loss", "train", ROOT / "configs" / "default.yaml", "--out", tmp_path / "o",
                 "recovery.loss=kll")
    assert not (tmp_path / "o").exists()


def test_yaml_alias_bomb_refused(capsys, tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, (prev, cur) in enumerate(zip("abcdefgh", "bcdefghi")):
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
        assert i < 9
    lines.append("model: {kwargs: {x: *i}}")  # 9^9 strings once expanded, under a valid key
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    expect_error(capsys, r"bomb\.yaml: .*alias bomb", "run", bomb, "--out", tmp_path / "o")


def test_yaml_many_aliases_refused():
    from deploy_prune.config import safe_yaml

    text = "a: &a 1\nb: [" + ", ".join(["*a"] * 1500) + "]\n"
    with pytest.raises(ConfigError, match="alias"):
        safe_yaml(text)
    assert safe_yaml("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases work


def test_yaml_too_large_refused(capsys, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    expect_error(capsys, r"big\.yaml: .*limit", "train", "--config", big, "--out", tmp_path / "o")


def test_yaml_not_text_refused(capsys, tmp_path):
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage\x80")
    expect_error(capsys, r"bin\.yaml", "train", "--config", f, "--out", tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# --force and the lock (deliverable 3)

def test_force_refuses_unmarked_dir(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a").write_text("hi")
    expect_error(capsys, r"not created by deploy-prune", "run", ROOT / "configs" / "default.yaml",
                 "--out", mine, "--force", *TINY)
    assert (mine / "a").read_text() == "hi"


def test_force_refuses_unmarked_dir_for_train(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a").write_text("hi")
    expect_error(capsys, r"not created by deploy-prune", "train", "--out", mine, "--force", *TINY,
                 "train.epochs=0")
    assert (mine / "a").read_text() == "hi"


def test_force_refuses_cwd(capsys, tmp_path, monkeypatch):
    (tmp_path / MARKER_FILE).write_text("{}")  # even a marked working directory is never emptied
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, r"working directory", "run", ROOT / "configs" / "default.yaml", "--out", ".",
                 "--force", *TINY)
    assert (tmp_path / "keep.txt").is_file()


@pytest.mark.parametrize("where", ["root", "home", "parent_of_cwd"])
def test_force_refuses_protected_paths(where, tmp_path, monkeypatch):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    target = {"root": Path("/"), "home": Path.home(), "parent_of_cwd": tmp_path / "a"}[where]
    with pytest.raises(FileExistsError, match="refuses"):
        check_removable(target)


def test_force_validates_before_deleting(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER_FILE).write_text("{}")
    (run_dir / "old.txt").write_text("previous run")
    expect_error(capsys, r"data\.root", "run", ROOT / "configs" / "default.yaml", "--out", run_dir,
                 "--force", "data.root=/nonexistent/fashion", "threads=1")
    assert (run_dir / "old.txt").is_file()  # the run was invalid: nothing deleted


def test_force_refuses_dir_in_use(capsys, tmp_path):
    run_dir = tmp_path / "run"
    holder = open_job_dir(run_dir, resume=False, force=False)
    (run_dir / "state.json").write_text("{}")
    try:
        expect_error(capsys, r"in use", "train", "--out", run_dir, "--force", *TINY, "train.epochs=0")
        assert (run_dir / "state.json").is_file()
    finally:
        holder.release()


@pytest.mark.parametrize("bad", ["model.kwargs={hidden: -1}", "model.weights=/nonexistent.pt"])
def test_force_checks_model_before_deleting(capsys, tmp_path, bad):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER_FILE).write_text("{}")
    (run_dir / "old.txt").write_text("previous run")
    expect_error(capsys, r"model\.(kwargs|weights)", "run", ROOT / "configs" / "default.yaml", "--out", run_dir,
                 "--force", *TINY, bad)
    assert (run_dir / "old.txt").is_file()


def test_force_empties_marked_dir(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER_FILE).write_text("{}")
    (run_dir / "stale").mkdir()
    (run_dir / "stale" / "x").write_text("1")
    lock = open_job_dir(run_dir, resume=False, force=True)
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([MARKER_FILE, ".deploy-prune.lock"])
    finally:
        lock.release()


def test_new_output_dirs_are_marked_and_shared(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    out = save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28), tmp_path / "m")
    assert (out / MARKER_FILE).is_file()
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir, not mkdtemp's 0700


def test_second_process_on_same_dir_fails_at_once(capsys, tmp_path):
    run_dir = tmp_path / "run"
    holder = open_job_dir(run_dir, resume=False, force=False)  # another flock on the same file
    try:
        import os

        line = expect_error(capsys, rf"in use .*pid {os.getpid()}", "run", ROOT / "configs" / "default.yaml",
                            "--out", run_dir, "--resume", *TINY)
        assert str(run_dir) in line
    finally:
        holder.release()
    OutputLock(run_dir).acquire().release()  # released: free again


# ---------------------------------------------------------------------------------------------
# NaN/Inf (deliverable 1)

def test_nan_training_stops_and_saves_nothing(capsys, tmp_path):
    out = tmp_path / "o"
    line = expect_error(capsys, r"train: .*(nan|inf|NaN).* (step \d+/\d+|diverged)", "train", "--out", out,
                        "train.lr=1e12", "train.epochs=3", *TINY)
    assert "train" in line
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("stage", ["train", "score", "recover[kl]", "finetune", "rbp probe"])
def test_fit_stops_on_nonfinite_loss(stage):
    from deploy_prune.train import fit

    model = torch.nn.Linear(2, 2)
    loader = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))] * 3
    calls = []

    def loss_fn(m, x, y):
        calls.append(1)
        out = m(x).sum()
        return out * (float("nan") if len(calls) == 2 else 1.0)

    saved = []
    with pytest.raises(NonFiniteError, match=rf"^{re.escape(stage)}: the loss became nan at step 2/3"):
        fit(model, loader, steps=3, loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            desc=stage, on_step=saved.append)
    assert saved == [1]  # no checkpoint after the bad step


def test_fit_stops_on_nonfinite_weights():
    from deploy_prune.train import fit

    model = torch.nn.Linear(2, 2)
    loader = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))]

    def loss_fn(m, x, y):
        return m(x).sum()  # finite at step 1; the infinite step size breaks the weights

    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    with pytest.raises(NonFiniteError, match=r"finetune: weights went NaN or infinite .* at step 1/1"):
        fit(model, loader, steps=1, loss_fn=loss_fn, optimizer=opt, desc="finetune")


def test_save_refuses_nonfinite_weights(tmp_path):
    model = build_model("small_vgg", num_classes=10, in_channels=1)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        save_model_dir(model, ModelPlan("small_vgg", 10, 1, 28), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_load_refuses_nonfinite_weights(tmp_path, small_vgg_dir):
    from safetensors.torch import load_file, save_file

    wf = small_vgg_dir / "model.safetensors"
    state = load_file(str(wf))
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k][0] = float("inf")
    save_file(state, str(wf), metadata={"plan_sha256": ModelPlan("small_vgg", 10, 1, 28).digest()})
    plan = json.loads((small_vgg_dir / "plan.json").read_text())
    plan.pop("weights_sha256")
    (small_vgg_dir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        load_model_dir(small_vgg_dir)


def _scores_file(tmp_path, model_dir, *, nan: bool = False) -> Path:
    from deploy_prune import pipeline
    from deploy_prune.config import RunConfig

    model, plan = load_model_dir(model_dir)
    result = pipeline.score(model, plan, RunConfig(), None, torch.device("cpu"), method="l1")
    if nan:
        for k in result["channel_scores"]:
            result["channel_scores"][k] = [math.nan] * len(result["channel_scores"][k])
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(result))
    return path


def test_nan_scores_refused(capsys, tmp_path, small_vgg_dir):
    scores = _scores_file(tmp_path, small_vgg_dir, nan=True)
    expect_error(capsys, r"scores\.json", "prune", small_vgg_dir, "--out", tmp_path / "slim",
                 "--scores", scores, "--target-flops", "2")
    assert not (tmp_path / "slim").exists()


def test_scores_from_other_weights_refused(capsys, tmp_path, small_vgg_dir):
    scores = _scores_file(tmp_path, small_vgg_dir)
    torch.manual_seed(1)
    other = save_model_dir(build_model("small_vgg", num_classes=10, in_channels=1),
                           ModelPlan("small_vgg", 10, 1, 28), tmp_path / "other")
    expect_error(capsys, r"other weights", "prune", other, "--out", tmp_path / "slim", "--scores", scores,
                 "--target-flops", "2")


def test_plan_with_nan_refused(capsys, small_vgg_dir):
    pf = small_vgg_dir / "plan.json"
    pf.write_text(pf.read_text().replace('"input_size": 28', '"input_size": NaN'))
    expect_error(capsys, r"plan\.json", "inspect", small_vgg_dir)


# ---------------------------------------------------------------------------------------------
# data (deliverable 4)

def _idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    blob = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)


def fashion_tree(root: Path, *, bad_label: int | None = None, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("t10k", 20)):
        _idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), gz=gz)
        labels = np.arange(n) % 10
        if bad_label is not None and split == "train":
            labels[3] = bad_label
        _idx(root / f"{split}-labels-idx1-ubyte", labels, gz=gz)
    return root


FASHION_TINY = ["data.name=fashion_mnist", "train.epochs=0", "threads=1"]


def test_missing_data_root_is_an_error(capsys, tmp_path):
    expect_error(capsys, r"/nonexistent", "train", "--out", tmp_path / "o", "--data-root", "/nonexistent",
                 *FASHION_TINY)


def test_data_root_without_dataset_does_not_fall_back(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, r"not falling back", "train", "--out", tmp_path / "o", "--data-root",
                 tmp_path / "empty", *FASHION_TINY)


def test_label_out_of_range_names_file(capsys, tmp_path):
    root = fashion_tree(tmp_path / "fm", bad_label=200)
    expect_error(capsys, r"train-labels-idx1-ubyte.*out of range", "train", "--out", tmp_path / "o",
                 "--data-root", root, *FASHION_TINY)


def test_truncated_gz_names_file(capsys, tmp_path):
    root = fashion_tree(tmp_path / "fm", gz=True)
    f = root / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    expect_error(capsys, r"train-images-idx3-ubyte\.gz", "train", "--out", tmp_path / "o", "--data-root",
                 root, *FASHION_TINY)


def test_garbage_gz_names_file(capsys, tmp_path):
    root = fashion_tree(tmp_path / "fm", gz=True)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    expect_error(capsys, r"t10k-labels-idx1-ubyte\.gz", "train", "--out", tmp_path / "o", "--data-root",
                 root, *FASHION_TINY)


def test_truncated_idx_names_file(capsys, tmp_path):
    root = fashion_tree(tmp_path / "fm")
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(capsys, r"train-images-idx3-ubyte: truncated", "train", "--out", tmp_path / "o",
                 "--data-root", root, *FASHION_TINY)


def test_fashion_tree_itself_loads(tmp_path):
    from deploy_prune.config import DataConfig
    from deploy_prune.data import load_data

    b = load_data(DataConfig(root=str(fashion_tree(tmp_path / "fm"))))
    assert b.num_classes == 10 and b.train.num_samples == 54  # the oracle tree of the tests above


# ---------------------------------------------------------------------------------------------
# provenance (deliverable 5)

def test_plan_sha256_checked_on_load(capsys, small_vgg_dir):
    pf = small_vgg_dir / "plan.json"
    data = json.loads(pf.read_text())
    data["plan_sha256"] = "0" * 64
    pf.write_text(json.dumps(data))
    expect_error(capsys, r"plan_sha256", "inspect", small_vgg_dir)


def test_swapped_weights_file_refused(tmp_path, small_vgg_dir):
    torch.manual_seed(3)
    other = save_model_dir(build_model("small_vgg", num_classes=10, in_channels=1),
                           ModelPlan("small_vgg", 10, 1, 28), tmp_path / "other")
    (small_vgg_dir / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_model_dir(small_vgg_dir)


def _slim_of(base_dir: Path, out: Path) -> Path:
    from conftest import random_plan
    from deploy_prune.allocation import cut
    from deploy_prune.nodes import discover

    model, plan = load_model_dir(base_dir)
    x = plan.example()
    kept = random_plan(discover(model, x), frac=0.5)
    slim_plan = ModelPlan("small_vgg", 10, 1, 28, kept=kept, info={"base_sha256": plan.digest()})
    return save_model_dir(cut(model, kept, x), slim_plan, out)


def test_bench_swapped_base_and_slim_refused(capsys, tmp_path, small_vgg_dir):
    slim = _slim_of(small_vgg_dir, tmp_path / "slim")
    expect_error(capsys, r"swapped", "bench", "--base", slim, "--slim", small_vgg_dir, "--out",
                 tmp_path / "b", "--backends", "torch", "--batch", "1")
    assert not (tmp_path / "b" / "results.json").exists()


@pytest.mark.parametrize("speedup", [0.0, -5.0, float("nan")])
def test_compare_refuses_unusable_baseline(speedup):
    import pandas as pd

    from bench.compare import compare

    row = {"model": "m", "backend": "ort", "device": "cpu", "precision": "fp32", "batch": 1,
           "variant": "slim", "status": "ok", "speedup": speedup, "speedup_ci_low": 1.0,
           "speedup_ci_high": 2.0}
    good = dict(row, speedup=2.0)
    with pytest.raises(ValueError, match="non-positive"):
        compare(pd.DataFrame([good]), pd.DataFrame([row]))


@pytest.mark.parametrize("option", [["--confidence", "1.5"], ["--bootstrap", "0"], ["--min-time", "nan"],
                                    ["--max-eval-samples", "0"], ["--batch", "0"]])
def test_bench_bad_option_is_one_line(capsys, tmp_path, small_vgg_dir, option):
    slim = _slim_of(small_vgg_dir, tmp_path / "slim")
    expect_error(capsys, re.escape(option[0].lstrip("-").split("-")[0]), "bench", "--base", small_vgg_dir,
                 "--slim", slim, "--out", tmp_path / "b", "--backends", "torch", *option)


def test_suite_stage_name_cannot_escape_out(capsys, tmp_path):
    cfg = tmp_path / "suite.yaml"
    cfg.write_text("stages:\n  - name: ../../x\n")
    expect_error(capsys, r"stages\[0\]\.name", "bench", "suite", cfg, "--out", tmp_path / "s")
    assert not (tmp_path.parent / "x").exists()


def test_inside_refuses_escape(tmp_path):
    from deploy_prune.artifacts import inside

    assert inside(tmp_path, tmp_path / "units" / "a.csv")
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path, tmp_path / "units" / ".." / ".." / "x.csv")


@pytest.mark.slow
def test_suite_onnx_cache_verified_against_plan(tmp_path, small_vgg_dir):
    from bench.studies.paper_claims.models import ONNX_FILE, ensure_onnx, onnx_matches
    from export.to_onnx import read_metadata

    slim = _slim_of(small_vgg_dir, tmp_path / "slim")
    ensure_onnx(small_vgg_dir)
    assert onnx_matches(small_vgg_dir / ONNX_FILE, small_vgg_dir)
    # the base's export planted in the slim slot (the 1.02x-next-to-3x case) is not reused
    (slim / ONNX_FILE).write_bytes((small_vgg_dir / ONNX_FILE).read_bytes())
    assert not onnx_matches(slim / ONNX_FILE, slim)
    ensure_onnx(slim)
    assert read_metadata(slim / ONNX_FILE)["plan_sha256"] == load_model_dir(slim)[1].digest()


def test_onnx_cache_mismatch_detected(tmp_path, small_vgg_dir, monkeypatch):
    """Fast form of the check above: metadata naming another plan is a mismatch."""
    import bench.studies.paper_claims.models as sm

    slim = _slim_of(small_vgg_dir, tmp_path / "slim")
    fake = slim / sm.ONNX_FILE
    fake.write_bytes(b"x")
    base_digest = load_model_dir(small_vgg_dir)[1].digest()
    monkeypatch.setattr("export.to_onnx.read_metadata", lambda p: {"plan_sha256": base_digest})
    assert not sm.onnx_matches(fake, slim)
    monkeypatch.setattr("export.to_onnx.read_metadata",
                        lambda p: {"plan_sha256": load_model_dir(slim)[1].digest()})
    assert sm.onnx_matches(fake, slim)


def test_suite_cached_unit_checked_against_models(tmp_path, small_vgg_dir):
    import pandas as pd

    from bench.studies.paper_claims.suite import unit_matches_models

    slim = _slim_of(small_vgg_dir, tmp_path / "slim")
    digest = load_model_dir(slim)[1].digest()
    rows = [{"status": "ok", "model_dir": str(slim), "plan_sha256": digest}]
    assert unit_matches_models(pd.DataFrame(rows))
    rows[0]["plan_sha256"] = load_model_dir(small_vgg_dir)[1].digest()  # measured on another model
    assert not unit_matches_models(pd.DataFrame(rows))


# ---------------------------------------------------------------------------------------------
# no tracebacks (deliverable 7)

def test_kept_wrong_type(capsys, small_vgg_dir):
    pf = small_vgg_dir / "plan.json"
    data = json.loads(pf.read_text())
    data["kept"] = [1, 2, 3]
    data.pop("plan_sha256")
    pf.write_text(json.dumps(data))
    expect_error(capsys, r"'kept' must be a mapping", "inspect", small_vgg_dir)


@pytest.mark.parametrize(("key", "value"), [("input_size", 100000), ("in_channels", 10**6),
                                            ("num_classes", 10**9), ("arch_kwargs", {"hidden": 10**7})])
def test_oversized_plan_refused(capsys, small_vgg_dir, key, value):
    pf = small_vgg_dir / "plan.json"
    data = json.loads(pf.read_text())
    data[key] = value
    data.pop("plan_sha256")
    data.pop("weights_sha256")
    pf.write_text(json.dumps(data))
    expect_error(capsys, rf"{key}|parameters|limit", "inspect", small_vgg_dir)


def test_pickle_as_weights(capsys, tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": object()}))
    expect_error(capsys, r"evil\.pt", "train", "--out", tmp_path / "o",
                 f"model.weights={evil}", *TINY, "train.epochs=0")


def test_truncated_model_weights(capsys, small_vgg_dir):
    wf = small_vgg_dir / "model.safetensors"
    wf.write_bytes(wf.read_bytes()[:200])
    expect_error(capsys, r"model\.safetensors", "inspect", small_vgg_dir)


def test_truncated_checkpoint(tmp_path):
    from deploy_prune.checkpoint import Checkpointer
    from deploy_prune.train import StepState

    model = build_model("small_vgg", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "ckpt" / "recover.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 truncated")
    ck = Checkpointer(path, {"model": model}, StepState(optimizer=opt, scheduler=None, steps=10))
    with pytest.raises(ArtifactError, match="recover.pt: unreadable checkpoint"):
        ck.restore()


def test_empty_training_split_is_an_error(capsys, tmp_path):
    # 1437 digits in the training split, all held out for validation: nothing left to train on
    expect_error(capsys, r"training split is empty", "train", "--out", tmp_path / "o", "data.name=digits",
                 "data.val_fraction=0.9999", "train.epochs=1", "threads=1")
    assert not (tmp_path / "o").exists()


def test_empty_evaluation_split_is_an_error():
    from deploy_prune.train import evaluate

    with pytest.raises(ValueError, match="evaluation split is empty"):
        evaluate(torch.nn.Linear(2, 2), [])


def test_corrupt_run_state_on_resume(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER_FILE).write_text("{}")
    (run_dir / "state.json").write_text('{"stages": ')
    expect_error(capsys, r"state\.json: corrupt", "run", ROOT / "configs" / "default.yaml", "--out", run_dir,
                 "--resume", *TINY)


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o"
    expect_error(capsys, r"No space left on device", "train", "--out", out, *TINY, "train.epochs=0")
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))  # nothing half-written


def test_unwritable_output_fails_before_work(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(capsys, r"not a directory", "train", "--out", f / "o", *TINY, "train.epochs=0")


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(capsys, r"not a directory", "run", ROOT / "configs" / "default.yaml", "--out", f, *TINY)
    assert f.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# docs/reliability.md is kept true: every test it names exists, and every case here is listed

def _test_names(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_reliability_table_names_real_tests():
    table = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", table)
    assert len(named) >= 40
    for file, name in named:
        assert (ROOT / file).is_file(), file
        assert name in _test_names(ROOT / file), f"docs/reliability.md names {file}::{name}, which does not exist"
    listed = {name for file, name in named if file == "tests/test_reliability.py"}
    helpers = {"test_reliability_table_names_real_tests", "test_fashion_tree_itself_loads"}
    unlisted = _test_names(Path(__file__)) - listed - helpers
    assert not unlisted, f"cases missing from docs/reliability.md: {sorted(unlisted)}"
