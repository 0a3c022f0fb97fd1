"""docs/config.md is generated from the config dataclasses and lists every key with a meaning."""

from __future__ import annotations

import dataclasses

from deploy_prune import _config_doc
from deploy_prune.config import RunConfig


def leaf_keys(cls: type = RunConfig, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        out |= leaf_keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return out


def test_every_key_has_type_default_and_meaning():
    rows = _config_doc.rows()
    assert {r[0] for r in rows} == leaf_keys()
    assert all(tp and default and meaning for _, tp, default, meaning in rows), \
        [r[0] for r in rows if not r[3]]


def test_committed_page_is_current():
    assert _config_doc.PAGE.read_text() == _config_doc.render(), \
        "docs/config.md is stale: run python -m deploy_prune._config_doc"


def test_defaults_shown_match_the_dataclasses():
    rows = {r[0]: r[2] for r in _config_doc.rows()}
    assert rows["train.lr"] == "`0.05`" and rows["threads"] == "`null`"
    assert rows["data.download"] == "`false`" and rows["model.arch"] == "`small_vgg`"
