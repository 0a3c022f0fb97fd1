"""Reading a user's weights file into a model: the formats people actually save.

Accepted: ``.safetensors``; ``.pth``/``.pt``/``.bin`` state_dicts read with
``torch.load(weights_only=True)`` (torchvision's own pretrained files are such state_dicts);
checkpoint dicts that hold the state_dict under a usual key (``state_dict``, ``model``,
``model_state_dict``, ``net``, ``ema``, ...); keys prefixed by ``module.`` (DataParallel/DDP)
or ``_orig_mod.`` (``torch.compile``). Refused with one line that says what the file is and
how to save a state_dict instead: TorchScript archives, whole pickled modules and anything else
``weights_only`` loading will not read. Nothing is ever unpickled beyond what
``weights_only=True`` allows.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Checkpoint keys that hold a state_dict, in order of preference (the trained weights first;
# an EMA copy only when it is all there is).
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights",
              "ema", "model_ema", "state_dict_ema", "ema_state_dict")
PREFIXES = ("module.", "_orig_mod.")
HOW_TO_SAVE = "save the weights with torch.save(model.state_dict(), PATH) and pass that file"


class WeightsError(ValueError):
    """A weights file cannot be read or does not fit the model; the message is one line."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as a flat state_dict, unwrapped and with prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" or _is_safetensors(path) else _read_torch(path)
    return strip_prefixes(_unwrap(obj, path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _read_torch(path: Path) -> object:
    if _is_torchscript(path):
        raise WeightsError(f"{path}: a TorchScript archive (torch.jit.save), not a state_dict; load it with "
                           f"torch.jit.load and {HOW_TO_SAVE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(_refused(path, str(e))) from None
    except Exception as e:  # a damaged or foreign file fails in many ways (KeyError, EOFError, ...)
        raise WeightsError(f"{path}: not a PyTorch or safetensors weights file ({type(e).__name__}: {_first_line(e)}); "
                           f"{HOW_TO_SAVE}") from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file whatever its name: an 8-byte header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _refused(path: Path, message: str) -> str:
    """One line for a pickle that ``weights_only`` refused, naming the class it wanted."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m and ("torch.nn" in m.group(1) or "models" in m.group(1) or _looks_like_module(m.group(1))):
        what = f"a whole pickled model ({m.group(1)}), saved with torch.save(model)"
    elif m:
        what = f"a pickle holding {m.group(1)}, which weights_only loading does not read"
    else:  # not a pickle weights_only can parse at all: damaged or not a checkpoint
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        reason = detail.group(1).strip()[:120] if detail else _first_line(Exception(message))
        return f"{path}: not a PyTorch or safetensors weights file (unreadable pickle: {reason}); {HOW_TO_SAVE}"
    return f"{path}: {what}, not a state_dict; {HOW_TO_SAVE}"


def _looks_like_module(qualname: str) -> bool:
    return qualname.rsplit(".", 1)[-1][:1].isupper()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _unwrap(obj: object, path: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    """The state_dict inside ``obj``: itself, or under one of :data:`STATE_KEYS`."""
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        for key in STATE_KEYS:
            if depth < 2 and isinstance(obj.get(key), Mapping):
                log.info("%s: using the checkpoint's %r entry", path, key)
                return _unwrap(obj[key], path, depth + 1)
        keys = ", ".join(map(str, list(obj)[:8]))
        raise WeightsError(f"{path}: a dict without a state_dict (keys: {keys}); expected tensors or one of "
                           f"the keys {', '.join(STATE_KEYS[:5])}; {HOW_TO_SAVE}")
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state_dict; {HOW_TO_SAVE}")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) wherever they lead."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
            k = k.replace("._orig_mod.", ".")
        out[k] = v
    return out


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path = "weights",
              arch: str | None = None) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one line listing a few keys and shapes.

    A prefix shared by every key (``model.``, ``backbone.``) is dropped when that makes the keys fit.
    """
    expected = model.state_dict()
    state = _fit_prefix(_drop_aux_heads(model, dict(state)), expected)
    problems = mismatch(expected, state)
    if problems:
        raise WeightsError(f"{source}: weights do not fit {arch or type(model).__name__}: {problems}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{source}: non-finite values (NaN/Inf) in {', '.join(bad[:3])}")
    model.load_state_dict(state, strict=True)


def _drop_aux_heads(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Auxiliary-head weights (GoogLeNet, Inception) when the model is built without them
    (``aux_logits=False``, models/tv.py): training-only, so a deployed model ignores them. They
    are the keys whose top-level module the model does not have (torchvision sets it to None)."""
    if getattr(model, "aux_logits", True) is not False:
        return state
    children = {name for name, _ in model.named_children()}

    def top(key: str) -> str:
        for wrapper in ("module.", "_orig_mod."):
            key = key.removeprefix(wrapper)
        return key.split(".", 1)[0]

    return {k: v for k, v in state.items() if top(k) in children}


def _fit_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(state) == set(expected) or not state:
        return state
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if set(stripped) == set(expected):
            return stripped
    return state


def mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """A short description of how ``state`` differs from ``expected`` ('' when it fits)."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} unexpected ({', '.join(extra[:3])})")
    if shapes:
        parts.append("shapes differ: " + ", ".join(
            f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)}" for k in shapes[:3]))
    hint = _hint(expected, state, shapes)
    return "; ".join(parts) + (f" ({hint})" if hint and parts else "")


def _hint(expected, state, shapes: list[str]) -> str:
    """Name the option that fixes the usual mismatches: class count and input channels."""
    if not shapes:
        return ""
    last = [k for k in expected if expected[k].ndim == 2][-1:]  # the classifier's weight
    if last and last[0] in shapes:
        return f"the file's classifier has {state[last[0]].shape[0]} classes: pass --num-classes " \
               f"{state[last[0]].shape[0]}"
    first = [k for k in expected if expected[k].ndim == 4][:1]
    if first and first[0] in shapes:
        return f"the file's first conv takes {state[first[0]].shape[1]} input channels: pass --channels " \
               f"{state[first[0]].shape[1]}"
    return ""


def load_weights(model: nn.Module, path: str | Path, *, arch: str | None = None) -> None:
    """Read a weights file (any format above) and load it into ``model``."""
    load_into(model, read_state_dict(path), source=path, arch=arch)
