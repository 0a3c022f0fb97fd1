"""ONNX models past protobuf's 2 GiB: weights as external data (``NAME.onnx.data`` beside the
graph), forced on a small model by lowering ``to_onnx.EXTERNAL_DATA_LIMIT``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bench.backends import Artifact, BackendOptions
from bench.backends.onnx_cache import seed_onnx
from bench.backends.ort import ORTBackend
from bench.guard import measure
from bench.timing import TimingConfig
from deploy_prune.artifacts import ModelPlan, save_model_dir
from deploy_prune.cli import main
from deploy_prune.models import build_model
from export import to_onnx
from export.errors import ParityError
from export.onnx_files import (
    check_external_data,
    data_path,
    external_files,
    onnx_files,
    remove_onnx,
)
from export.to_onnx import check_onnx, export_onnx, open_session, read_metadata, verify_onnx
from export.to_trt import build_engine

EXAMPLE = torch.zeros(2, 3, 32, 32)


def small_vgg(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_vgg", num_classes=10, in_channels=3).eval()


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture
def external(monkeypatch):
    """Every export from here on writes its weights as external data."""
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_LIMIT", 0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(model, NAME.onnx written with external data, the same model exported as one file)."""
    root = tmp_path_factory.mktemp("ext")
    model = small_vgg()
    single = export_onnx(model, EXAMPLE, root / "single" / "m.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(to_onnx, "EXTERNAL_DATA_LIMIT", 0)
        path = export_onnx(model, EXAMPLE, root / "ext" / "m.onnx", metadata={"note": "big"})
    return model, path, single


def test_forced_external_data_writes_two_files_and_nothing_else(pair):
    model, path, single = pair
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporaries
    assert sorted(p.name for p in single.parent.iterdir()) == ["m.onnx"]
    assert onnx_files(path) == [path, data_path(path)] and onnx_files(single) == [single]
    # the weights moved: the data file holds (nearly) all parameter bytes, the graph almost none
    assert data_path(path).stat().st_size >= 0.9 * param_bytes(model)
    assert path.stat().st_size < 0.05 * data_path(path).stat().st_size
    graph = onnx.load(str(path), load_external_data=False).graph
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}  # relative to the model's folder, not a temporary's name


def test_external_data_model_runs_like_the_single_file_one(pair):
    model, path, single = pair
    assert read_metadata(path)["note"] == "big"  # metadata without loading the weights
    check_onnx(path)
    assert max(verify_onnx(path, model).values()) < 1e-4
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = open_session(path).run(None, {"input": x})[0]
    want = ort.InferenceSession(str(single), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)  # same graph, same weights, other storage


def test_a_moved_pair_still_loads_and_a_lone_graph_does_not(pair, tmp_path):
    model, path, _ = pair
    for f in onnx_files(path):  # what any copy must carry
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert max(verify_onnx(tmp_path / "m.onnx", model).values()) < 1e-4
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "m.onnx").write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="m.onnx.data: the external-data file of .*missing"):
        verify_onnx(lone / "m.onnx", model)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_data_file_is_one_line_naming_it(damage, pair, tmp_path):
    model, path, _ = pair
    for f in onnx_files(path):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data, copy = tmp_path / "m.onnx.data", tmp_path / "m.onnx"
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    for call in (lambda: verify_onnx(copy, model), lambda: check_onnx(copy), lambda: open_session(copy),
                 lambda: build_engine(copy, tmp_path / "m.engine"),  # TensorRT checks before importing it
                 lambda: ort_backend_on(copy, model)):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(str(data)) and damage in msg, msg
    read_metadata(copy)  # the graph itself is fine
    assert not (tmp_path / "m.engine").exists()


def ort_backend_on(path, model):
    """The bench's ort backend handed an exported file (as the suite seeds it)."""
    plan = ModelPlan("small_vgg", 10, 3, 32)
    art = Artifact(name="base", path=path.parent, model=model, plan=plan, workdir=path.parent)
    seed_onnx(art, path)
    ORTBackend(device="cpu", precision="fp32").prepare(art, plan.example(1))


def test_escaping_external_location_is_refused(pair, tmp_path):
    _, path, _ = pair
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    bad = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(bad))
    with pytest.raises(ValueError, match="expected a file name relative to the model's folder"):
        check_external_data(bad)


def test_parity_failure_with_external_data_leaves_neither_file(external, tmp_path, monkeypatch):
    def wrong(*args, **kwargs):
        raise ParityError("ONNX Runtime differs from PyTorch (injected)")

    monkeypatch.setattr(to_onnx, "check_parity", wrong)
    with pytest.raises(ParityError):
        export_onnx(small_vgg(), EXAMPLE, tmp_path / "out" / "m.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_overwriting_keeps_graph_and_data_in_step(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    export_onnx(small_vgg(0), EXAMPLE, out, verify=False)
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_LIMIT", 0)
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(small_vgg(1), EXAMPLE, out, verify=False)
    export_onnx(small_vgg(1), EXAMPLE, out, force=True, verify=False)  # single -> external
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    verify_onnx(out, small_vgg(1))
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_LIMIT", 2**31 - 1)
    export_onnx(small_vgg(2), EXAMPLE, out, force=True, verify=False)  # external -> single: its old data goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    verify_onnx(out, small_vgg(2))


def test_a_stray_data_file_is_not_overwritten_without_force(external, tmp_path):
    stray = tmp_path / "m.onnx.data"
    stray.write_text("someone's file")
    with pytest.raises(FileExistsError, match="m.onnx.data already exists"):
        export_onnx(small_vgg(), EXAMPLE, tmp_path / "m.onnx")
    assert stray.read_text() == "someone's file" and not (tmp_path / "m.onnx").exists()


def test_remove_onnx_takes_its_data_file_only(pair, tmp_path):
    _, path, _ = pair
    for f in onnx_files(path):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "other.data").write_text("keep")
    remove_onnx(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.data"]


def test_ort_backend_benches_an_external_data_export(external, tmp_path):
    """The bench's ort backend exports into its workdir, loads the pair from there and runs it;
    the guard's paired timing goes through it end to end."""
    model, plan = small_vgg(), ModelPlan("small_vgg", 10, 3, 32)
    workdir = tmp_path / "work"
    workdir.mkdir()
    backend = ORTBackend(device="cpu", precision="fp32", options=BackendOptions(threads=1))
    backend.prepare(Artifact(name="base", path=workdir, model=model, plan=plan, workdir=workdir), plan.example(1))
    try:
        assert external_files(backend.path) == [data_path(backend.path)]
        x = torch.randn(2, 3, 32, 32)
        got = torch.as_tensor(backend.download(backend.run(backend.upload(x))))
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-3, atol=1e-4)
        assert backend.describe()["artifact"] == str(backend.path)
    finally:
        backend.close()
    tiny = TimingConfig(warmup_s=0.0, warmup_iters=1, min_time_s=0.05, rounds=3, min_samples=6,
                        min_per_round=2, clock="cpu")
    m = measure(model, plan, small_vgg(1), plan, timing=tiny)
    assert np.isfinite(m["speedup"]) and m["low"] <= m["speedup"] <= m["high"]


def test_cli_export_names_both_files(external, tmp_path, capsys):
    model = small_vgg()
    model_dir = save_model_dir(model, ModelPlan("small_vgg", 10, 3, 32), tmp_path / "model")
    out = tmp_path / "m.onnx"
    rc = main(["export", str(model_dir), "--format", "onnx", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0 and f"-> {out} + m.onnx.data (" in stdout
    assert max(verify_onnx(out, model).values()) < 1e-4


def test_tensorrt_parser_is_given_the_models_path(pair):
    """TensorRT's parser reads external weights relative to ``path`` (parse(model, path=...)); a
    recording stand-in for the tensorrt module checks that the builder passes it."""
    from types import SimpleNamespace

    from export.to_trt import BuildSettings, _build, _read_onnx, plan_build

    _, path, _ = pair
    settings = BuildSettings("fp32", 1, 1, 1, 1.0, None)
    onnx_in = _read_onnx(path, settings)
    assert onnx_in.data == path.read_bytes() and onnx_in.chw == (3, 32, 32)  # the graph alone
    calls = []

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, model, path=None):
            calls.append((model, path))
            return False  # stop the build here: the call is what is checked

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    trt = SimpleNamespace(Logger=Logger, OnnxParser=Parser,
                          NetworkDefinitionCreationFlag=SimpleNamespace(),
                          Builder=lambda logger: SimpleNamespace(create_network=lambda flags: object()))
    with pytest.raises(ValueError, match="parser rejected it"):
        _build(trt, onnx_in, settings, plan_build(10, "fp32"), None)
    assert calls == [(onnx_in.data, str(path))]


def test_a_failed_commit_puts_the_old_pair_back(external, tmp_path, monkeypatch):
    """If the graph's rename fails after the new data file moved in, the replaced model and its
    data file are restored as they were (the old graph never runs on the new weights)."""
    import export._staging as staging

    out = tmp_path / "m.onnx"
    export_onnx(small_vgg(0), EXAMPLE, out, verify=False)
    before = {f.name: f.read_bytes() for f in onnx_files(out)}
    real = staging.os.replace

    def failing(src, dst):
        if str(dst) == str(out) and Path(src).parent != tmp_path:  # the staged graph, not a restore
            raise OSError("injected: rename of the staged graph failed")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        export_onnx(small_vgg(1), EXAMPLE, out, force=True, verify=False)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    verify_onnx(out, small_vgg(0))


def test_a_data_file_the_old_graph_did_not_use_is_left_alone(tmp_path):
    out = tmp_path / "m.onnx"
    export_onnx(small_vgg(0), EXAMPLE, out, verify=False)  # one file
    (tmp_path / "m.onnx.data").write_text("not the model's")
    export_onnx(small_vgg(1), EXAMPLE, out, force=True, verify=False)  # one file again
    assert (tmp_path / "m.onnx.data").read_text() == "not the model's"
