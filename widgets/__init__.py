"""nbtune's notebook UI: the config builder, the memory panel, the live training dashboard and Try it.

Widgets are thin views over engine objects (a TuneConfig, a Run, a MemoryEstimate); all logic lives in nbtune/.
Importing this package is light; ipywidgets and plotly load with the first widget.
"""

from __future__ import annotations

from nbtune._lazy import lazy_getattr

_LAZY = {
    "Builder": "nbtune.widgets.builder",
    "Dashboard": "nbtune.widgets.dashboard",
    "MemoryPanel": "nbtune.widgets.memory_panel",
    "TryIt": "nbtune.widgets.try_it",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
