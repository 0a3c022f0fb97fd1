"""A small named registry, one per extension point (scorers, mimic losses, models, backends)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Duplicate names raise; a miss lists what exists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._fallback: Callable[[str], T | None] | None = None

    def set_fallback(self, resolver: Callable[[str], T | None]) -> None:
        """Resolve names outside the table (e.g. ``tv.NAME`` for any torchvision model)."""
        self._fallback = resolver

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@SCORERS.register("beta")``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        found = self._fallback(name) if self._fallback else None
        if found is None:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return found

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
