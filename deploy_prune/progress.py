"""Progress bars that also show in CI logs.

``tqdm(disable=None)`` hides the bar whenever stderr is not a terminal, which is exactly where a
deployment engineer's long job runs (CI, ``nohup``, a redirected log). Here the bar stays on:
redrawn every 2 s on a terminal, and written as a plain ASCII line every 30 s to a log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from deploy_prune import distributed

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, on in logs too; shown by rank 0 only unless ``enabled`` says."""
    if enabled is None:
        enabled = distributed.is_main()
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 2 if tty else 30)
    if not tty:
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, disable=not enabled, **kwargs)
