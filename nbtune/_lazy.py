"""Lazy module attributes: public names that live in heavier modules, imported on first use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_getattr(module_name: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports `table[name]` on first access and caches the attribute."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[module_name], name, value)
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
