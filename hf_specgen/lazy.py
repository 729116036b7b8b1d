"""Names a package exports, imported on first use (a module-level `__getattr__`, PEP 562), so that importing
the package loads none of the heavy stacks (torch, transformers, TRL) its modules need."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(
    package: str, names: Mapping[str, str], check: Callable[[str], None] | None = None
) -> Callable[[str], Any]:
    """A module `__getattr__` that imports each of `names` from its module the first time it is asked for.

    Args:
        package: the package's `__name__`.
        names: `{name: relative module}`, e.g. `{"wise_ft": ".interpolate"}`.
        check: called with the name before its module is imported (e.g. to say which extra it needs).

    Returns:
        The function to assign to the package's `__getattr__`.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if check is not None:
            check(name)
        return getattr(importlib.import_module(names[name], package), name)

    return __getattr__
