"""nbtune's notebook UI: the config builder, the memory panel and the live training dashboard.

Widgets are thin views over engine objects (a TuneConfig, a Run, a MemoryEstimate); all logic lives in nbtune/.
Importing this package is light; ipywidgets and plotly load with the first widget.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Builder": "nbtune.widgets.builder",
    "Dashboard": "nbtune.widgets.dashboard",
    "MemoryPanel": "nbtune.widgets.memory_panel",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbtune.widgets' has no attribute {name!r}")
