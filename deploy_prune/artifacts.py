"""Model directories: ``plan.json`` (architecture + kept channels + provenance) and
``model.safetensors``. One function rebuilds any model, base or slim, from such a directory.

No pickled modules: rebuilding means building the base architecture, cutting it with the plan,
then loading the weights, which must match the plan tensor for tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.models import build_model
from deploy_prune.surgery import apply_plan

FORMAT = "deploy-prune/model-dir@1"
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(ValueError):
    """A model directory is missing, corrupt, or does not match its plan."""


@dataclass
class ModelPlan:
    """What a model directory says about its model: enough to rebuild it."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, list[int]] | None = None  # None: the unpruned base model
    info: dict[str, Any] = field(default_factory=dict)  # config, widths, flops, versions, ...

    def example(self, batch: int = 1) -> torch.Tensor:
        """A zero input of the model's shape, (B, C, H, W)."""
        return torch.zeros(batch, self.in_channels, self.input_size, self.input_size)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "arch": self.arch, "arch_kwargs": self.arch_kwargs,
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "kept": self.kept, **self.info}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "plan") -> ModelPlan:
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{source}: not a deploy-prune model plan (format {data.get('format')!r})")
        core = {"arch", "arch_kwargs", "num_classes", "in_channels", "input_size", "kept", "format"}
        missing = {"arch", "num_classes", "in_channels", "input_size"} - set(data)
        if missing:
            raise ArtifactError(f"{source}: missing keys {sorted(missing)}")
        return cls(arch=data["arch"], arch_kwargs=dict(data.get("arch_kwargs") or {}),
                   num_classes=int(data["num_classes"]), in_channels=int(data["in_channels"]),
                   input_size=int(data["input_size"]), kept=data.get("kept"),
                   info={k: v for k, v in data.items() if k not in core})

    def digest(self) -> str:
        """sha256 of the architecture and kept channels: what fixes the weight shapes."""
        key = json.dumps([self.arch, self.arch_kwargs, self.num_classes, self.in_channels, self.kept],
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()


def versions() -> dict[str, str]:
    """Library versions for provenance."""
    import torch_pruning

    import deploy_prune

    out = {"deploy_prune": deploy_prune.__version__, "torch": torch.__version__,
           "torch_pruning": torch_pruning.__version__, "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import torchvision

        out["torchvision"] = torchvision.__version__
    return out


def build_from_plan(plan: ModelPlan) -> nn.Module:
    """Build the base architecture and cut it with the plan (random weights)."""
    if plan.arch.startswith("custom:"):
        raise ArtifactError(f"architecture {plan.arch[7:]} is your own class, not a registered one; rebuild it "
                            "in Python with deploy_prune.load(DIR, model=YourModel(...))")
    model = build_model(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels,
                        **plan.arch_kwargs)
    if plan.kept:
        apply_plan(model, plan.kept, plan.example())
    return model.eval()


def check_output(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``; commands call it before any long work."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists; pass --force to overwrite it")
    return out


def atomic_dir(out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """A temporary sibling of ``out`` to write into, then :func:`commit_dir`."""
    out = check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    return out, tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``tmp`` directory."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model_dir(model: nn.Module, plan: ModelPlan, out: str | Path, *, force: bool = False) -> Path:
    """Write ``plan.json`` and ``model.safetensors`` to ``out`` atomically."""
    from safetensors.torch import save_file

    plan.info.setdefault("versions", versions())
    plan.info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    plan.info["plan_sha256"] = plan.digest()
    out, tmp = atomic_dir(out, force=force)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"plan_sha256": plan.digest()})
        (tmp / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_json_object(path: str | Path, *, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; missing, corrupt or non-object files raise ``error``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def read_plan(path: str | Path) -> ModelPlan:
    """Read ``DIR/plan.json`` with clear errors for a missing or foreign directory."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a model directory (expected a folder with {PLAN_FILE} "
                            f"and {WEIGHTS_FILE})")
    pf = path / PLAN_FILE
    if not pf.is_file():
        raise ArtifactError(f"{path}: no {PLAN_FILE}; not a deploy-prune model directory")
    return ModelPlan.from_json(read_json_object(pf, error=ArtifactError), source=str(pf))


def load_model_dir(path: str | Path) -> tuple[nn.Module, ModelPlan]:
    """Rebuild the model saved in ``path`` (eval mode, CPU) and return it with its plan."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    plan = read_plan(path)
    wf = Path(path) / WEIGHTS_FILE
    if not wf.is_file():
        raise ArtifactError(f"{path}: no {WEIGHTS_FILE}")
    try:
        state = load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{wf}: unreadable or truncated weights ({e})") from None
    model = build_from_plan(plan)
    _check_state(model, state, wf)
    model.load_state_dict(state, strict=True)
    return model.eval(), plan


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{source}: weights do not match the plan (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ArtifactError(f"{source}: weights do not match the plan: {k} has shape "
                                f"{tuple(state[k].shape)}, the plan builds {tuple(v.shape)}")
