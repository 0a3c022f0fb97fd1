"""The house rules, checked on the source: imports go one way (deploy_prune -> export -> bench,
studies last), no module import cycle, studies found from folder names, and every registered
scorer keeps the scorer contract.

Imports are read from the AST of every module (module level, inside functions, and under
``TYPE_CHECKING`` alike), so a late import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("deploy_prune", "export", "bench")
LAYER = {"deploy_prune": 0, "export": 1, "bench": 2, "bench.studies": 3}  # may import lower or equal


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports: ``from a.b import c`` is ``a.b.c`` when that is a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # ``import a.b.c`` of a name inside a module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> tuple[str, int]:
    key = "bench.studies" if module == "bench.studies" or module.startswith("bench.studies.") else module.split(".")[0]
    return key, LAYER[key]


def test_the_walk_sees_the_known_edges():
    """The oracle itself: edges that exist in the tree are found (module and function level)."""
    assert "deploy_prune.allocation" in GRAPH["deploy_prune.pipeline"]
    assert "deploy_prune.decisions" in GRAPH["deploy_prune.scoring.rbp"]
    assert "bench.studies.paper_claims.suite" in GRAPH["bench.studies.paper_claims"]  # inside a function
    assert len(MODULES) > 60


def test_no_upward_import():
    """deploy_prune never imports export or bench; export never imports bench; nothing outside
    bench.studies imports a study (studies reach the CLI through entry points)."""
    upward = []
    for src, targets in GRAPH.items():
        (src_key, src_layer) = _layer(src)
        for dst in targets:
            dst_key, dst_layer = _layer(dst)
            if dst_layer > src_layer:
                upward.append(f"{src} -> {dst}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_init_cycle(comp: list[str]) -> bool:
    """A package's ``__init__`` importing its submodules, which import names from the package's
    own private base module, is no cycle: exactly one member is the package and every other is
    its direct child importing only the package's children."""
    pkgs = [m for m in comp if all(o == m or o.startswith(m + ".") for o in comp)]
    return len(pkgs) == 1


def test_no_import_cycle():
    cycles = [c for c in _cycles(GRAPH) if not _is_package_init_cycle(c)]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not _cycles({"a": {"b"}, "b": {"c"}, "c": set()})


def test_every_study_is_a_folder_entry_with_a_command():
    """Each module or package under bench/studies/ is one study, and each is on the command line
    through an entry point (deploy_prune.commands or deploy_prune.bench_actions)."""
    root = REPO / "bench" / "studies"
    studies = sorted({p.stem for p in root.glob("*.py") if p.stem != "__init__"}
                     | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()})
    assert {"ablation", "paper_claims", "latency_target", "fashion_accuracy"} <= set(studies)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]
    targets = [v.split(":")[0] for group in ("deploy_prune.commands", "deploy_prune.bench_actions")
               for v in points.get(group, {}).values()]
    missing = [s for s in studies if not any(t == f"bench.studies.{s}" or t.startswith(f"bench.studies.{s}.")
                                             for t in targets)]
    assert not missing, f"studies without a command entry point: {missing}"


# --- every registered scorer keeps the contract --------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from deploy_prune.config import RunConfig, from_dict
    from deploy_prune.data import load_data
    from deploy_prune.models import build_model
    from deploy_prune.nodes import discover

    torch.manual_seed(0)
    cfg = from_dict(RunConfig, {
        "data": {"name": "digits", "batch_size": 64, "max_train_samples": 256},
        "scoring": {"epochs": 0.25, "rbp": {"epochs_per_layer": 0.1, "probe_epochs": 0.1}},
        "allocation": {"flops_reduction": 1.5},
    })
    data = load_data(cfg.data, seed=0)
    model = build_model("small_vgg", num_classes=10, in_channels=1).eval()
    example = torch.zeros(1, 1, 8, 8)
    return cfg, data, model, discover(model, example), example


def _all_scorers() -> list[str]:
    from deploy_prune.scoring import SCORERS

    return SCORERS.names()


@pytest.mark.parametrize("name", _all_scorers())
def test_scorer_conformance(name, tiny):
    """One finite score per channel of every node; weights untouched; deterministic for a seed;
    only its own config section; a decision, if any, that the prune takes; and the scores JSON
    the pipeline writes reads back."""
    import copy
    import dataclasses

    from deploy_prune import pipeline
    from deploy_prune.artifacts import ModelPlan
    from deploy_prune.config import RunConfig
    from deploy_prune.scoring import SCORERS, Decision

    cfg, data, model, nodes, example = tiny
    cls = SCORERS.get(name)
    sub = cls.config_of(cfg)
    assert not isinstance(sub, RunConfig), f"{name} must receive its own config section, not the run config"
    assert dataclasses.is_dataclass(sub)
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ModelPlan("small_vgg", 10, 1, 8)
    torch.manual_seed(0)
    res = pipeline.score(model, plan, cfg, data if cls.needs_data else None, torch.device("cpu"), method=name)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{name} changed {k}")
    scores, decision = pipeline.scored(res, plan, source=name)
    assert set(scores) == {n.name for n in nodes}
    for n in nodes:
        assert scores[n.name].shape == (n.channels,) and np.isfinite(scores[n.name]).all(), n.name
    assert res["scorer"] == name and set(res["node_scores"]) == set(scores)
    torch.manual_seed(0)
    again = pipeline.score(copy.deepcopy(model), plan, cfg, data if cls.needs_data else None,
                           torch.device("cpu"), method=name)
    assert again["channel_scores"] == res["channel_scores"], f"{name} is not deterministic for a seed"
    if decision is not None:
        assert isinstance(decision, Decision) and decision.by == name
    pruned = pipeline.prune(model, plan, cfg, scores, decision=decision)
    assert pruned.allocation.flops_reduction > 1.0
    if decision is not None:
        assert pruned.plan.info["widths"] == {n.name: decision.widths.get(n.name, n.channels) for n in nodes}
