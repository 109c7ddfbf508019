"""A name -> function registry that raises on duplicate names (verl ``core_algos`` style).

Each algorithm family (advantage estimators, policy losses, KL estimators, loss aggregators) owns
one ``Registry`` instance. Configs select entries by string; an unknown name raises with the list of
known names, so a typo in a YAML file fails at start-up rather than silently falling back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Explicit registry of named functions for one algorithm family."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@REGISTRY.register("name")``; raises ``ValueError`` on a duplicate name."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """Return the function registered as ``name``; raises ``KeyError`` naming the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
