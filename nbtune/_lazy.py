"""Lazy module attributes (public names that live in heavier modules, imported on first use), and the one
guarded import of the heavy libraries."""

from __future__ import annotations

import importlib
import sys
import threading
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


_HEAVY_LOCK = threading.Lock()
_heavy_imported = False


def import_heavy() -> None:
    """Import torch, transformers and peft once, one thread at a time.

    Two threads importing transformers at once can see it half initialised ("cannot import name 'AutoConfig'
    from 'transformers'"): the builder loads them on a background thread while the next cell may already
    estimate or train. Every nbtune path that needs them calls this first; later calls cost nothing.
    """
    global _heavy_imported
    if _heavy_imported:
        return
    with _HEAVY_LOCK:
        if not _heavy_imported:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers

            transformers.AutoConfig  # noqa: B018  (resolves the lazy top level while this thread holds the lock)
            _heavy_imported = True
