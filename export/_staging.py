"""Write artifacts under a temporary name in the target folder; rename only once verified.

A failed export therefore never leaves a half-written or unverified file at the output path,
and the final ``os.replace`` is atomic because source and target share a folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy_prune.artifacts import check_output


def ensure_writable(out: Path, *, force: bool) -> None:
    """Refuse to overwrite ``out`` without ``force``; create its folder."""
    if out.is_dir():
        raise ValueError(f"output {out} is a directory; expected a file path")
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)


def temp_sibling(out: Path, suffix: str = "") -> Path:
    """A fresh hidden name next to ``out`` (``suffix`` keeps tools that check it happy)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextmanager
def staged(out: Path, *, force: bool, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path; rename it over ``out`` when the block succeeds, else delete it."""
    ensure_writable(out, force=force)
    tmp = temp_sibling(out, suffix)
    try:
        yield tmp
        if not tmp.is_file():
            raise ValueError(f"export produced no file at {tmp}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_onnx(out: Path, *, force: bool) -> Iterator[Path]:
    """:func:`staged` for an ONNX model that may come with its external-data file.

    Yields a path in a hidden folder beside ``out`` (``out``'s name, ending in ``.onnx`` as the
    checker wants); an external-data file must be written there as ``data_path(out).name``, the
    location the graph names relative to itself, so both are checked and run as they will be
    found. On success the data file moves into place first and the graph last, so
    ``out`` never appears before its weights; a replaced model (and its data file) is moved
    aside first, so an old ``.onnx`` never meets the new data, and deleted once the new pair is
    in place. On failure nothing at ``out`` changes.
    """
    from export.onnx_files import data_path, external_files

    ensure_writable(out, force=force)
    check_output(data_path(out), force=force)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp = tmp_dir / (out.name if out.suffix == ".onnx" else f"{out.name}.onnx")
    data = tmp_dir / data_path(out).name
    try:
        yield tmp
        if not tmp.is_file():
            raise ValueError(f"export produced no file at {tmp}")
        _commit_onnx(tmp, out, data=data if data in external_files(tmp) else None)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _commit_onnx(tmp: Path, out: Path, *, data: Path | None) -> None:
    """Move the staged graph (and its data file) over ``out``; see :func:`staged_onnx`.

    What it replaces (the old graph, and the old data file when the new model writes one or the
    old graph used it) is first moved aside, put back if a rename fails, and deleted once the
    new pair is in place; a data file the old graph did not use is left alone.
    """
    from export.onnx_files import data_path

    final_data = data_path(out)
    old_used_data = out.is_file() and final_data in _external_or_none(out)
    replaced = [p for p, go in ((out, True), (final_data, data is not None or old_used_data))
                if go and p.is_file()]
    asides = [(p, temp_sibling(p)) for p in replaced]
    for p, aside in asides:
        os.replace(p, aside)
    try:
        if data is not None:
            os.replace(data, final_data)  # the weights first: the graph never appears without them
        os.replace(tmp, out)
    except BaseException:
        if data is not None and not data.exists():
            final_data.unlink(missing_ok=True)
        for p, aside in asides:
            os.replace(aside, p)
        raise
    for _, aside in asides:
        aside.unlink(missing_ok=True)


def _external_or_none(path: Path) -> list[Path]:
    """The external-data files ``path`` uses, or [] when it is no ONNX model."""
    from export.onnx_files import external_files

    try:
        return external_files(path)
    except (OSError, ValueError):
        return []


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
