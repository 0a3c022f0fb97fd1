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


class NonFiniteError(ValueError):
    """A loss, a weight, a score or a plan value is NaN or infinite; nothing of it is saved."""


# What a plan may ask for (a plan is data from a file: it must not ask for 40 GB)
MAX_PLAN_BYTES = 16 << 20
MAX_INPUT_SIZE = 4096
MAX_IN_CHANNELS = 64
MAX_CLASSES = 100_000
MAX_PARAMS = 2_000_000_000  # 8 GB of fp32 weights, counted on the meta device before building


def _plan_int(data: Mapping[str, Any], key: str, hi: int, source: str) -> int:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ArtifactError(f"{source}: {key} must be an integer in [1, {hi}], got {v!r}")
    return v


def _plan_kept(kept: Any, source: str) -> dict[str, list[int]] | None:
    if kept is None:
        return None
    if not isinstance(kept, dict):
        raise ArtifactError(f"{source}: 'kept' must be a mapping of node name -> kept channel "
                            f"indices (or null), got {type(kept).__name__}")
    for name, idx in kept.items():
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise ArtifactError(f"{source}: kept[{name!r}] must be a list of integer channel indices")
        if len(idx) > 1_000_000:
            raise ArtifactError(f"{source}: kept[{name!r}] lists {len(idx)} channels, over the limit")
    return kept


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes: which weights these are."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict with a NaN or infinite floating-point value, naming the tensor."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise NonFiniteError(f"{what}: {bad} of {v.numel()} values of {k} are NaN or infinite; "
                                 "refusing to save a broken model (lower the learning rate?)")


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
        if not isinstance(data["arch"], str):
            raise ArtifactError(f"{source}: arch must be a string, got {data['arch']!r}")
        kwargs = data.get("arch_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ArtifactError(f"{source}: arch_kwargs must be a mapping, got {type(kwargs).__name__}")
        return cls(arch=data["arch"], arch_kwargs=dict(kwargs),
                   num_classes=_plan_int(data, "num_classes", MAX_CLASSES, source),
                   in_channels=_plan_int(data, "in_channels", MAX_IN_CHANNELS, source),
                   input_size=_plan_int(data, "input_size", MAX_INPUT_SIZE, source),
                   kept=_plan_kept(data.get("kept"), source),
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


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter moves to the meta device as it is registered: a model is built with at most
    one real parameter at a time, while the builder's own tensor arithmetic stays on the CPU."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def check_model_size(arch: str, *, num_classes: int, in_channels: int, source: str,
                     **kwargs: Any) -> None:
    """Build ``arch`` on the meta device (no memory) and refuse more than ``MAX_PARAMS``
    parameters, or arguments the builder does not take, as one line naming ``source``."""
    try:
        try:
            with torch.device("meta"):
                meta = build_model(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
        except RuntimeError as e:  # a builder that reads tensor values (torchvision RegNet's widths)
            if "meta" not in str(e):
                raise
            with _parameters_on_meta():
                meta = build_model(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    except KeyError as e:
        raise ArtifactError(f"{source}: {e.args[0] if e.args else e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{source}: cannot build {arch} with {kwargs}: {e}") from None
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise ArtifactError(f"{source}: {arch} with {kwargs} would have {n:,} parameters, over the "
                            f"{MAX_PARAMS:,} limit")


def build_from_plan(plan: ModelPlan, *, source: str = "plan") -> nn.Module:
    """Build the base architecture and cut it with the plan (random weights)."""
    if plan.arch.startswith("custom:"):
        raise ArtifactError(f"architecture {plan.arch[7:]} is your own class, not a registered one; rebuild it "
                            "in Python with deploy_prune.load(DIR, model=YourModel(...))")
    check_model_size(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels,
                     source=source, **plan.arch_kwargs)
    model = build_model(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels,
                        **plan.arch_kwargs)
    if plan.kept:
        try:
            apply_plan(model, plan.kept, plan.example())
        except ValueError as e:
            raise ArtifactError(f"{source}: {e}") from None
    return model.eval()


MARKER_FILE = ".deploy-prune"  # written into every directory deploy-prune creates
LOCK_FILE = ".deploy-prune.lock"  # flock'd by the process writing a run directory


class OutputBusyError(FileExistsError):
    """Another deploy-prune process holds the output directory's lock."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    """The mode a plain ``mkdir`` would give (0755 under the usual umask): model directories
    are shared like the reports beside them, not 0700 as ``mkdtemp`` makes them."""
    return 0o777 & ~_umask()


def write_marker(directory: Path, kind: str) -> None:
    """Mark ``directory`` as created by deploy-prune: only such directories may be --force'd."""
    (directory / MARKER_FILE).write_text(json.dumps({"created_by": "deploy-prune", "kind": kind}) + "\n")


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be deleted (the root, home, the working directory or one of its
    parents), or None."""
    p = path.resolve()
    if p == Path(p.anchor):
        return "it is the filesystem root"
    if p == Path.home().resolve():
        return "it is your home directory"
    cwd = Path.cwd().resolve()
    if cwd == p or p in cwd.parents:
        return "it is the working directory or one of its parents"
    return None


def check_removable(out: Path) -> None:
    """``--force`` may delete ``out`` only when deploy-prune created it (its marker file is
    there) or it is empty, and never when it is /, home, or the working directory's ancestry."""
    why = _protected(out)
    if why:
        raise FileExistsError(f"--force refuses to delete {out}: {why}")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise FileExistsError(f"--force refuses to delete {out}: it was not created by deploy-prune "
                              f"(no {MARKER_FILE} marker inside); remove it yourself or choose another --out")
    if not out.is_dir() and not out.is_file():
        raise FileExistsError(f"--force refuses to replace {out}: not a regular file or directory")
    if (out / LOCK_FILE).is_file():  # a run still working in it: never delete under its feet
        OutputLock(out).acquire().release()


def _check_writable(out: Path) -> None:
    """The nearest existing folder above ``out`` must be a writable directory (checked before any
    long work, not after it)."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {parent} is not writable")


def check_output(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an existing output unless ``force`` (and then only one --force may delete: see
    :func:`check_removable`); commands call it before any long work."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"output {out} already exists; pass --force to overwrite it")
        check_removable(out)
    _check_writable(out)
    return out


def atomic_dir(out: str | Path, *, force: bool = False, kind: str = "model-dir") -> tuple[Path, Path]:
    """A temporary sibling of ``out`` to write into, then :func:`commit_dir`."""
    out = check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, dir_mode())
    write_marker(tmp, kind)
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


def inside(root: str | Path, path: str | Path) -> Path:
    """``path``, refused when it resolves outside ``root`` (a name from a config such as
    ``../../x`` must never become a path outside --out)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise ValueError(f"{path} lies outside {root}; names from a config must stay under --out")
    return Path(path)


class OutputLock:
    """An exclusive ``flock`` on ``DIR/.deploy-prune.lock`` holding the owner's pid: a second
    process on the same directory fails at once with one line naming the holder."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(f"{self.path.parent} is in use by another deploy-prune process "
                                  f"(pid {holder}); wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def open_job_dir(out: Path, *, resume: bool, force: bool, kind: str = "run") -> OutputLock:
    """Create (or reuse, or with ``force`` empty) a job directory and lock it; returns the held
    lock. Call it only once the config and inputs are validated: ``force`` deletes content."""
    keep = {MARKER_FILE, LOCK_FILE}
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    busy = out.is_dir() and any(p.name not in keep for p in out.iterdir())
    if busy and not resume:
        if not force:
            raise FileExistsError(f"run directory {out} is not empty; pass --resume to continue it "
                                  "or --force to start over")
        check_removable(out)
    if not out.exists():
        _check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER_FILE).is_file():
        write_marker(out, kind)
    lock = OutputLock(out).acquire()
    if busy and force and not resume:
        for p in out.iterdir():
            if p.name in keep:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return lock


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
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite_state(state, f"{out}")
    plan.info["plan_sha256"] = plan.digest()
    plan.info["weights_sha256"] = weights_digest(state)
    out, tmp = atomic_dir(out, force=force)
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"plan_sha256": plan.digest()})
        (tmp / PLAN_FILE).write_text(finite_json(plan.to_json(), what=f"{out}/{PLAN_FILE}") + "\n")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def finite_json(data: Any, *, what: str) -> str:
    """``json.dumps(data, indent=1)`` refusing NaN and infinities (strict JSON, and a wrong
    number is never written as a result)."""
    try:
        return json.dumps(data, indent=1, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"{what}: refusing to write a NaN or infinite value") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def read_json_object(path: str | Path, *, error: type[Exception] = ValueError, finite: bool = False,
                     max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from ``path``; missing, corrupt or non-object files raise ``error``.
    ``finite`` refuses NaN/Infinity; ``max_bytes`` refuses larger files before parsing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{path}: {path.stat().st_size} bytes is over the {max_bytes}-byte limit")
    try:
        data = json.loads(path.read_text(), parse_constant=_no_constant if finite else None)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
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
    plan = ModelPlan.from_json(read_json_object(pf, error=ArtifactError, finite=True, max_bytes=MAX_PLAN_BYTES),
                               source=str(pf))
    recorded = plan.info.get("plan_sha256")
    if recorded is not None and recorded != plan.digest():
        raise ArtifactError(f"{pf}: plan_sha256 does not match the plan's architecture and kept "
                            "channels (edited or corrupt plan)")
    return plan


def load_model_dir(path: str | Path) -> tuple[nn.Module, ModelPlan]:
    """Rebuild the model saved in ``path`` (eval mode, CPU) and return it with its plan."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    plan = read_plan(path)
    check_model_size(plan.arch, num_classes=plan.num_classes, in_channels=plan.in_channels,
                     source=str(Path(path) / PLAN_FILE), **plan.arch_kwargs)  # before reading weights
    wf = Path(path) / WEIGHTS_FILE
    if not wf.is_file():
        raise ArtifactError(f"{path}: no {WEIGHTS_FILE}")
    try:
        state = load_file(str(wf))
        with safe_open(str(wf), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{wf}: unreadable or truncated weights ({e})") from None
    if meta.get("plan_sha256") not in (None, plan.digest()):
        raise ArtifactError(f"{wf}: these weights were saved for another plan (plan_sha256 differs)")
    recorded = plan.info.get("weights_sha256")
    if recorded is not None and recorded != weights_digest(state):
        raise ArtifactError(f"{wf}: weights_sha256 in {PLAN_FILE} does not match these weights "
                            "(swapped or modified model.safetensors)")
    try:
        check_finite_state(state, str(wf))
    except NonFiniteError as e:
        raise ArtifactError(str(e).split("; refusing")[0]) from None
    model = build_from_plan(plan, source=str(Path(path) / PLAN_FILE))
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
