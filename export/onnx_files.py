"""An ONNX model on disk: the ``.onnx`` graph and, past protobuf's 2 GiB limit, its weights.

A model whose serialised graph would exceed 2 GiB is written with its large tensors as ONNX
*external data*: one ``NAME.onnx.data`` file beside ``NAME.onnx``, which names it by a location
relative to its own folder (what torch's ``ONNXProgram.save`` also writes). ONNX Runtime,
``onnx.checker`` on a path and TensorRT's parser (given the model's path) read it from there, so
the two files must travel together: whatever copies, moves, removes or lists an exported model
takes :func:`onnx_files`, not the ``.onnx`` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx

from export.errors import first_line

DATA_SUFFIX = ".data"  # NAME.onnx -> NAME.onnx.data


def data_path(path: str | Path) -> Path:
    """Where the external data of ``path`` is written: ``NAME.onnx.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _tensors(sub)


def _external(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, dict[str, str]]]:
    for t in _tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t, {e.key: e.value for e in t.external_data}


def _load_graph(path: Path) -> onnx.ModelProto:
    """The graph of ``path`` without its external data (one line when it is no ONNX model)."""
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ValueError(f"{path}: not an ONNX model ({type(e).__name__}: {first_line(e)})") from None


def _resolve(path: Path, location: str, tensor: str) -> Path:
    """``location`` under the model's folder; absolute or escaping locations are refused."""
    loc = Path(location)
    if not location or loc.is_absolute() or ".." in loc.parts:
        raise ValueError(f"{path}: tensor {tensor!r} names its external data {location!r}; expected "
                         f"a file name relative to the model's folder")
    return path.parent / loc


def external_files(path: str | Path, proto: onnx.ModelProto | None = None) -> list[Path]:
    """The external-data files ``path`` reads its tensors from (``[]`` for a single-file model)."""
    path = Path(path)
    proto = _load_graph(path) if proto is None else proto
    files = {_resolve(path, info.get("location", ""), t.name) for t, info in _external(proto)}
    return sorted(files)


def onnx_files(path: str | Path) -> list[Path]:
    """``path`` and its external-data files: what a copy, a move or a listing must keep together."""
    return [Path(path), *external_files(path)]


def onnx_size(path: str | Path) -> int:
    """Bytes on disk of the model: the graph plus its external data."""
    return sum(p.stat().st_size for p in onnx_files(path) if p.is_file())


def check_external_data(path: str | Path, proto: onnx.ModelProto | None = None) -> None:
    """Every external tensor of ``path`` lies inside a regular file beside it, else one line
    naming that file (missing, or truncated: shorter than the tensor's offset plus length)."""
    path = Path(path)
    proto = _load_graph(path) if proto is None else proto
    for t, info in _external(proto):
        f = _resolve(path, info.get("location", ""), t.name)
        if not f.is_file():
            raise FileNotFoundError(f"{f}: the external-data file of {path} is missing (it holds the "
                                    f"weights; keep it beside the .onnx file under this name)")
        try:
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        except ValueError:
            raise ValueError(f"{path}: tensor {t.name!r} has a non-integer external-data offset or "
                             f"length") from None
        size = f.stat().st_size
        if size < end:
            raise ValueError(f"{f}: the external-data file of {path} is truncated ({size} bytes; tensor "
                             f"{t.name!r} needs bytes up to {end})")


def check_data_file(path: str | Path) -> None:
    """:func:`check_external_data` when ``path`` parses as an ONNX graph; a file that does not
    passes (the loader that reads it names that problem). Loaders call it once they failed, so
    a model that loads is not parsed twice."""
    try:
        proto = _load_graph(Path(path))
    except (OSError, ValueError):  # not an ONNX graph at all
        return
    check_external_data(path, proto)


def remove_onnx(path: str | Path) -> None:
    """Delete ``path`` and the external-data file our exports write beside it (``NAME.onnx.data``,
    when ``path`` refers to it); a foreign file's other data files are left alone."""
    path = Path(path)
    try:
        ours = data_path(path) in external_files(path)
    except (OSError, ValueError):  # not an ONNX file: only the file itself goes
        ours = False
    path.unlink(missing_ok=True)
    if ours:
        data_path(path).unlink(missing_ok=True)
