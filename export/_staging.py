"""Write artifacts under a temporary name in the target folder; rename only once verified.

A failed export therefore never leaves a half-written or unverified file at the output path,
and the final ``os.replace`` is atomic because source and target share a folder.
"""

from __future__ import annotations

import os
import secrets
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
