"""Name -> implementation registries for every extension point.

A registry is a plain dict behind a decorator. Looking up an unknown name
fails with the known names listed and the closest one suggested, so a typo in
a config or on the command line is caught at once, before a model loads.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar
from .errors import InputError, NotFoundError

T = TypeVar("T")


class UnknownNameError(NotFoundError):
    """Raised for a name that no implementation registered."""


class Registry(Generic[T]):
    """A named collection of factories for one extension point (engines, tasks...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """The named implementation built with keyword arguments, checked against its
        signature first: an unknown argument (`--arg`, `--engine-arg`, `--prm-arg`) is an
        error that names it and lists the ones it takes, not a TypeError from inside."""
        factory = self.get(name)
        check_arguments(f"{self.kind} {name!r}", factory, kwargs)
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def check_arguments(what: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise InputError for keyword arguments `factory` does not take (a factory with
    **kwargs takes anything)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"{what} takes no argument {', '.join(map(repr, unknown))}.{hint} "
                         f"It takes: {', '.join(names) or '(none)'}")


DEFAULT_STRATEGY = "repeated_sampling"
"""The strategy of a run that names none: n independent samples per problem. Here, at
the bottom of the import graph, so the run spec can default to it without importing
the strategies."""
