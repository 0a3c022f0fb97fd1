"""Bring your own model: weight formats, import, the model's own preprocessing, run --base from
the directory alone, the recover command and the Python API example."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deploy_prune.artifacts import load_model_dir
from deploy_prune.cli import main
from deploy_prune.config import DataConfig
from deploy_prune.data import load_data
from deploy_prune.models import build_model
from deploy_prune.pipeline import resolve_config
from deploy_prune.weights import WeightsError, load_weights

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses/pickling look the module up by name
    spec.loader.exec_module(mod)
    return mod


def _small_vgg(in_channels: int = 1) -> nn.Module:
    return build_model("small_vgg", num_classes=10, in_channels=in_channels).eval()


def _save(fmt: str, model: nn.Module, path: Path) -> Path:
    """``model``'s weights in one of the formats users bring."""
    sd = model.state_dict()
    if fmt.startswith("safetensors"):
        from safetensors.torch import save_file

        path = path if fmt == "safetensors_named_pth" else path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    obj = {
        "state_dict": sd,
        "ckpt_state_dict": {"epoch": 7, "state_dict": sd, "optimizer": {"lr": 0.1}},
        "ckpt_model": {"model": sd, "epoch": 3},
        "ckpt_model_state_dict": {"model_state_dict": sd, "best_acc": 91.0},
        "ckpt_ema": {"ema": sd, "step": 10},
        "dataparallel": nn.DataParallel(model).state_dict() if not torch.cuda.is_available()
        else {f"module.{k}": v for k, v in sd.items()},
        "compiled": torch.compile(model).state_dict(),  # lazy: keys gain _orig_mod., nothing compiles
        "ddp_compiled_in_ckpt": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    }[fmt]
    torch.save(obj, path)
    return path


FORMATS = ["safetensors", "safetensors_named_pth", "state_dict", "ckpt_state_dict", "ckpt_model", "ckpt_model_state_dict", "ckpt_ema",
           "dataparallel", "compiled", "ddp_compiled_in_ckpt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_formats_round_trip_to_identical_outputs(tmp_path, fmt):
    src = _small_vgg()
    with torch.no_grad():  # non-default BN statistics, so buffers must round-trip too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    path = _save(fmt, src, tmp_path / "w.pth")
    dst = _small_vgg()
    x = torch.randn(4, 1, 28, 28)
    assert not torch.equal(dst(x), src(x))  # a fresh model differs, so the check below can fail
    load_weights(dst, path)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_torchvision_state_dict_file_round_trips(tmp_path):
    """torchvision's own pretrained files are plain state_dicts saved with torch.save."""
    import torchvision

    src = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "mnv3.pth")
    dst = build_model("tv.mobilenet_v3_small", num_classes=10, in_channels=3).eval()
    load_weights(dst, tmp_path / "mnv3.pth", arch="tv.mobilenet_v3_small")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def _bad_file(kind: str, path: Path) -> Path:
    model = _small_vgg()
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 28, 28)), path)
    elif kind == "pickled_module":
        torch.save(model, path)
    elif kind == "garbage":
        path.write_bytes(b"\x80\x04 not really a checkpoint" * 20)
    elif kind == "text":
        path.write_text("weights: none\n")
    elif kind == "truncated":
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "empty_safetensors":
        path = path.with_suffix(".safetensors")
        path.write_bytes(b"")
    elif kind == "other_arch":
        torch.save(build_model("resnet20", num_classes=10, in_channels=1).state_dict(), path)
    elif kind == "wrong_classes":
        torch.save(build_model("small_vgg", num_classes=7, in_channels=1).state_dict(), path)
    elif kind == "nan":
        sd = model.state_dict()
        sd["features.0.weight"][0, 0, 0, 0] = float("nan")
        torch.save(sd, path)
    elif kind == "dict_without_weights":
        torch.save({"epoch": 3, "acc": 0.9}, path)
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind,expect", [
    ("torchscript", "TorchScript archive"), ("pickled_module", "whole pickled model"),
    ("garbage", "not a PyTorch or safetensors weights file"), ("text", "not a PyTorch"),
    ("truncated", "not a PyTorch"), ("empty_safetensors", "not a readable safetensors"),
    ("other_arch", "do not fit small_vgg"), ("wrong_classes", "--num-classes 7"),
    ("nan", "non-finite"), ("dict_without_weights", "without a state_dict"),
])
def test_bad_weights_give_one_line_and_exit_2(tmp_path, capsys, kind, expect):
    path = _bad_file(kind, tmp_path / "bad.pth")
    out = tmp_path / "base"
    code = main(["import", "--arch", "small_vgg", "--weights", str(path), "--data", "digits", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert expect in err[0] and str(path) in err[0]
    if kind in ("torchscript", "pickled_module", "garbage"):
        assert "torch.save(model.state_dict(), PATH)" in err[0]
    assert not out.exists()  # nothing half-written


def test_unknown_arch_suggests_torchvision_name(tmp_path, capsys):
    path = _save("state_dict", _small_vgg(), tmp_path / "w.pth")
    code = main(["import", "--arch", "resnet18", "--weights", str(path), "--data", "digits",
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "did you mean tv.resnet18" in err[0]


def test_digits_resized_and_repeated_to_three_channels():
    plain = load_data(DataConfig(name="digits"), seed=0)
    big = load_data(DataConfig(name="digits", image_size=20, channels=3, mean=[0.0], std=[1.0]), seed=0)
    xb, yb = next(iter(big.test))
    x0, y0 = next(iter(plain.test))
    assert xb.shape[1:] == (3, 20, 20) and big.in_channels == 3 and big.image_size == 20
    torch.testing.assert_close(yb, y0)
    torch.testing.assert_close(xb[:, 0], xb[:, 2])  # gray repeated
    assert 0.0 <= xb.min() and xb.max() <= 1.0 + 1e-6  # mean 0 / std 1: the [0, 1] pixels themselves
    assert big.preprocess.to_json()["input_size"] == 20


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of digits: 12 train and 6 val images per class."""
    make = _example("make_imagefolder")
    return make.build(tmp_path_factory.mktemp("if") / "digits", source="digits", train=12, val=6)


def test_import_top1_equals_the_users_own_eval_loop(tree, tmp_path, capsys):
    """The stored eval transform reproduces the user's: same input tensors, same top-1."""
    own = _example("train_own_model")
    model = own.train(str(tree), arch="resnet18", size=32, epochs=2)
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    base = tmp_path / "base"
    code = main(["import", "--arch", "tv.resnet18", "--weights", str(weights), "--data", str(tree),
                 "--input-size", "32", "--out", str(base)])
    out = capsys.readouterr().out
    assert code == 0, out
    printed = float(re.search(r"top-1 ([0-9.]+)%", out).group(1))
    users = own.own_top1(model, str(tree), 32)
    assert printed == pytest.approx(users, abs=0.005)

    # every later stage rebuilds the data from the directory: the same tensors as the user's transform
    _, plan = load_model_dir(base)
    assert plan.info["preprocess"] | {} == {"input_size": 32, "resize": 37, "crop": 32, "channels": 3,
                                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                           "interpolation": "bilinear"}
    data = load_data(resolve_config(plan, None, None).data, seed=0)
    from torchvision.datasets import ImageFolder

    theirs = ImageFolder(str(tree / "val"), transform=own.transforms(32)[1])
    ours = torch.cat([x for x, _ in data.test])
    torch.testing.assert_close(ours, torch.stack([theirs[i][0] for i in range(len(theirs))]), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_base_on_imagefolder_needs_no_config_and_recover_works(tree, tmp_path, capsys):
    torch.save(_small_vgg(in_channels=3).state_dict(), tmp_path / "sv.pth")
    base = tmp_path / "base"
    assert main(["import", "--arch", "small_vgg", "--weights", str(tmp_path / "sv.pth"), "--data", str(tree),
                 "--input-size", "16", "--out", str(base)]) == 0
    imported = json.loads((base / "plan.json").read_text())
    fast = ["scoring.method=l1", "recovery.epochs=0.2", "finetune.epochs=0.2", "threads=1"]
    run_dir = tmp_path / "run"
    assert main(["run", "--base", str(base), "--out", str(run_dir), *fast]) == 0  # no CONFIG at all
    report = json.loads((run_dir / "report.json").read_text())
    assert report["base"]["top1"] == pytest.approx(imported["metrics"]["top1"])  # same images, same transform
    slim = json.loads((run_dir / "slim" / "plan.json").read_text())
    assert slim["preprocess"] == imported["preprocess"] and slim["input_size"] == 16
    assert slim["config"]["data"]["name"] == "imagefolder"

    # a config file made for another dataset only overrides the recipe, not the base's data
    run2 = tmp_path / "run2"
    assert main(["run", str(ROOT / "configs" / "default.yaml"), "--base", str(base), "--out", str(run2),
                 *fast, "scoring.epochs=0.1"]) == 0
    assert json.loads((run2 / "report.json").read_text())["config"]["data"]["name"] == "imagefolder"

    rec = tmp_path / "rec"
    capsys.readouterr()
    assert main(["recover", str(run_dir / "pruned"), "--base", str(base), "--out", str(rec),
                 "recovery.epochs=0.2"]) == 0
    assert "recovered small_vgg" in capsys.readouterr().out
    model, plan = load_model_dir(rec)
    assert plan.kept == json.loads((run_dir / "pruned" / "plan.json").read_text())["kept"]
    assert main(["recover", str(run_dir / "pruned"), "--base", str(run_dir / "slim"), "--out",
                 str(tmp_path / "rec2")]) == 2  # not its base


def test_api_example_runs(capsys):
    result = _example("prune_own_model").main(["--quick"])
    assert result["reloaded_identical"] == 1.0
    assert result["flops_reduction"] == pytest.approx(2.0, rel=0.05)
    assert result["recovered"] > result["pruned"]
    assert "outputs identical: True" in capsys.readouterr().out


def test_api_custom_model_needs_its_constructor_to_load(tmp_path):
    import deploy_prune
    from deploy_prune.artifacts import ArtifactError

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()

    net = make()
    slim, plan = deploy_prune.prune(net, torch.zeros(1, 1, 12, 12), keep_fraction=0.5, crucial=["3"])
    assert plan.arch == "custom:torch.nn.modules.container.Sequential"
    assert slim[0].out_channels == 4 and net[0].out_channels == 8  # cut a copy; the user's model is untouched
    deploy_prune.save(slim, plan, tmp_path / "slim")
    with pytest.raises(ArtifactError, match="model=YourModel"):
        deploy_prune.load(tmp_path / "slim")
    again, _ = deploy_prune.load(tmp_path / "slim", model=make)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(again(x), slim(x), rtol=0, atol=0)
    with pytest.raises(WeightsError):
        load_weights(_small_vgg(), tmp_path / "slim" / "model.safetensors")


@pytest.mark.parametrize("settings,theirs", [
    ({"image_size": 32, "resize": 37}, "Resize(37) CenterCrop(32) imagenet"),
    ({"image_size": 24, "resize": 0, "interpolation": "bicubic"}, "Resize((24, 24), bicubic) imagenet"),
    ({"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}, "Resize(18) CenterCrop(16) gray"),
])
def test_stored_transform_gives_the_users_tensors(tree, settings, theirs):
    """Each preprocessing option reproduces the torchvision transform a user would have written."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    user = {
        "Resize(37) CenterCrop(32) imagenet": T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), norm]),
        "Resize((24, 24), bicubic) imagenet": T.Compose([
            T.Resize((24, 24), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), norm]),
        "Resize(18) CenterCrop(16) gray": T.Compose([T.Resize(18), T.CenterCrop(16), T.Grayscale(1), T.ToTensor(),
                                                    T.Normalize([0.5], [0.25])]),
    }[theirs]
    data = load_data(DataConfig(name="imagefolder", root=str(tree), **settings), seed=0)
    ours = torch.cat([x for x, _ in data.test])
    ref = ImageFolder(str(tree / "val"), transform=user)
    torch.testing.assert_close(ours, torch.stack([ref[i][0] for i in range(len(ref))]), rtol=0, atol=0)


def test_api_prune_runs_the_slowdown_guard_unless_told_not_to():
    """deploy_prune.prune times the slim model against the user's (the CLI's guard) and records it;
    a required speedup it cannot meet raises instead of returning a model."""
    import deploy_prune
    from deploy_prune.speed import SlowerThanRequired

    torch.manual_seed(0)
    net = nn.Sequential(*(m for i in range(4) for m in (
        nn.Conv2d(3 if i == 0 else 64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.zeros(1, 3, 32, 32)
    _, plan = deploy_prune.prune(net, x, target_flops=2.0)
    check = plan.info["speed_check"]
    assert check["backend"] == "ort" and check["speedup"] > 0 and check["flops_reduction"] > 1.5
    _, plan = deploy_prune.prune(net, x, target_flops=2.0, speed_check=False)
    assert "speed_check" not in plan.info
    with pytest.raises(SlowerThanRequired, match="require-speedup 1000"):
        deploy_prune.prune(net, x, target_flops=2.0, config=["speed_check.require_speedup=1000"])
