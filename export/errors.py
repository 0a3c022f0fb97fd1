"""The errors the export stage raises besides the builtin ones."""

from __future__ import annotations


class ParityError(ValueError):
    """An exported artifact computes something other than the PyTorch model it came from."""


class BackendUnavailableError(RuntimeError):
    """A format needs a package or a device this machine lacks; the message names which."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: deep library errors can span pages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
