import pytest

from deploy_prune._registry import Registry
from deploy_prune.config import ConfigError, RunConfig, load_config, parse_overrides


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\nmodel:\n  arch: resnet20\n")
    cfg = load_config(f, ["train.lr=0.1", "allocation.flops_reduction=4", "crucial.nodes=[a, b]"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.1
    assert cfg.model.arch == "resnet20"
    assert cfg.allocation.flops_reduction == 4.0 and isinstance(cfg.allocation.flops_reduction, float)
    assert cfg.crucial.nodes == ["a", "b"]
    assert cfg.recovery.loss == RunConfig().recovery.loss == "kl"


def test_exponent_floats_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("finetune:\n  lr: 1e-5\n")
    assert load_config(f, ["scoring.lr=1e-4"]).finetune.lr == 1e-5
    assert load_config(None, ["scoring.lr=1e-4"]).scoring.lr == 1e-4


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epochz'"):
        load_config(None, ["train.epochz=3"])
    f = tmp_path / "c.yaml"
    f.write_text("recovry:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="recovry"):
        load_config(f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train.epochs: expected int"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int"):
        load_config(None, ["data.batch_size=1.5"])


def test_missing_file_and_bad_override():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


def test_registry_duplicates_and_misses():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")
