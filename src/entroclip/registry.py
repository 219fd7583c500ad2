"""Name -> factory registries with import-path resolution (tasks and rewards each keep one)."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    return ":" in name


def check_import_path(path: str) -> None:
    """Raise a ValueError unless ``path`` looks like ``"package.module:attribute"`` outside the standard
    library and the builtins (``os:system``, ``builtins:eval``): a task or reward is the user's own code."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import path must look like 'package.module:attribute', got {path!r}")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ValueError(
            f"import path {path!r} points into the Python standard library ({top!r}); a task or reward "
            "must come from a module of your own"
        )


def import_object(path: str) -> Any:
    """The object named by ``"package.module:attribute"`` (see :func:`check_import_path`)."""
    check_import_path(path)
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (import path {path!r})") from None


def check_options(
    fn: Callable[..., Any], options: Mapping[str, Any], what: str, *, partial: bool = False
) -> None:
    """Raise a ValueError listing the accepted options when ``fn`` cannot take ``options`` as keywords.

    With ``partial=True`` only unknown names are errors (required arguments may be supplied later).
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        (signature.bind_partial if partial else signature.bind)(**options)
    except TypeError as e:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = [p.name for p in signature.parameters.values() if p.kind in kinds]
        raise ValueError(
            f"invalid options for {what}: {e}; accepted options: {', '.join(accepted) or 'none'}"
        ) from None


class Registry(Generic[T]):
    """Factories by name. Entries may be import paths, imported on first use (optional dependencies load
    only when asked for); a name containing ``":"`` that is not registered is imported directly."""

    def __init__(self, kind: str, builtins: Mapping[str, str | Callable[..., T]]) -> None:
        self.kind = kind
        self._entries: dict[str, str | Callable[..., T]] = dict(builtins)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, factory: Callable[..., T]) -> None:
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name must be non-empty and contain no ':', got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = factory

    def resolve(self, name: str) -> Any:
        """The registered factory, or the object an unregistered ``"module:attr"`` name points to."""
        entry = self._entries.get(name)
        if entry is None:
            if not is_import_path(name):
                raise ValueError(
                    f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}, "
                    "or an import path 'package.module:attribute'"
                )
            entry = name
        return import_object(entry) if isinstance(entry, str) else entry
