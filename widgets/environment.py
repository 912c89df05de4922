"""Where the UI runs: which notebook front-end, whether widgets can render, and the notes said only once."""

from __future__ import annotations

import os
import sys
from typing import Any

_said: set[str] = set()


def say_once(message: str) -> None:
    """Print a note the first time it is needed in this process, never again."""
    if message not in _said:
        _said.add(message)
        print(message)


def ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def frontend() -> str:
    """colab, vscode, jupyter (a kernel with some front-end: Lab, Notebook 7, nbclient), terminal or none."""
    shell = ipython()
    if shell is None:
        return "none"
    if "google.colab" in sys.modules:
        return "colab"
    if getattr(shell, "kernel", None) is None:
        return "terminal"
    if os.environ.get("VSCODE_PID") or os.environ.get("VSCODE_CWD"):
        return "vscode"
    return "jupyter"


def widgets_available() -> bool:
    """True when ipywidgets is installed and a kernel can talk to a front-end (comms)."""
    if os.environ.get("NBTUNE_NO_WIDGETS"):
        return False
    if frontend() not in ("jupyter", "vscode", "colab"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_frontend() -> None:
    """Colab renders ipywidgets 7 natively; with ipywidgets 8 installed its custom widget manager is needed."""
    if frontend() != "colab":
        return
    try:
        import ipywidgets

        if int(ipywidgets.__version__.split(".")[0]) >= 8:
            from google.colab import output  # type: ignore[import-not-found]

            output.enable_custom_widget_manager()
    except Exception:  # an older Colab without the switch: built-in controls still render
        pass


def no_widgets_note() -> None:
    say_once("nbtune: interactive widgets are not available here; showing printed progress and static charts.")


def set_tooltip(widget: Any, text: str) -> None:
    """Hover help on a control, for ipywidgets 8 (`tooltip`) and 7 (`description_tooltip`)."""
    if not text:
        return
    if widget.has_trait("tooltip"):
        widget.tooltip = text
    elif widget.has_trait("description_tooltip"):
        widget.description_tooltip = text


def view_bundle(widget: Any) -> dict[str, Any]:
    """A widget's view as a raw mime bundle, for display handles under ipywidgets 7 and 8.

    `handle.update(widget)` replaces the output under ipywidgets 8 but appends a second view under 7 (its
    widgets display themselves, without the display id); a raw bundle replaces it under both.
    """
    text = repr(widget)
    return {"text/plain": text if len(text) <= 110 else text[:110] + "…",
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                         "model_id": widget.model_id}}
