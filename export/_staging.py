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
    ``out`` never appears before its weights; a replaced model is moved aside first (an old
    ``.onnx`` never meets the new data) and its own data file goes once the new pair is in
    place. On failure nothing at ``out`` changes.
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
    """Move the staged graph (and its data file) over ``out``; see :func:`staged_onnx`."""
    from export.onnx_files import data_path

    aside = None
    if out.is_file():
        aside = temp_sibling(out, ".onnx")
        os.replace(out, aside)  # the old graph leaves before its data file is replaced
    try:
        if data is not None:
            os.replace(data, data_path(out))
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and not out.exists():
            os.replace(aside, out)
        raise
    if aside is not None:
        if data is None and data_path(out) in _external_or_none(aside):
            data_path(out).unlink(missing_ok=True)  # the replaced model's weights belong to nothing now
        aside.unlink(missing_ok=True)


def _external_or_none(path: Path) -> list[Path]:
    from export.onnx_files import external_files

    try:
        return external_files(path)
    except (OSError, ValueError):  # the replaced file was no ONNX model
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
