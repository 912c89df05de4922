"""Form controls generated from field descriptions (a method's registry fields, or a config section's fields).

One `FieldControl` per field: the input that suits the field's kind, its help as the tooltip, and a message
line that shows the field's validation problem. No form is ever written by hand for one method.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from nbtune.widgets.environment import set_tooltip

from nbtune.methods.registry import Field

LABEL_WIDTH = "170px"
INPUT_WIDTH = "360px"
AUTO = "(auto)"

# Injected once with the builder: how an invalid field looks (works in Lab, Notebook 7, VS Code and Colab).
STYLE = """<style>
.nbtune-invalid input, .nbtune-invalid textarea, .nbtune-invalid select { border-color: #c62828 !important;
  background: #fff5f5 !important; }
.nbtune-message { color: #c62828; font-size: 12px; margin: -2px 0 4px 176px; line-height: 1.3; }
.nbtune-help { color: #616161; font-size: 12px; }
.nbtune-section-note { color: #424242; font-size: 12px; margin: 2px 0 6px 0; line-height: 1.45; }
.nbtune-builder .widget-html-content { line-height: 1.45; }
</style>"""


class FieldControl:
    """The input for one field; `value` reads it as the config wants it, `show_problem` marks it."""

    def __init__(self, dotted: str, field: Field, value: Any, on_change: Callable[[], None]):
        self.dotted = dotted
        self.field = field
        self.input = _make_input(field, display_value(field, value))
        self.input.description = field.name.replace("_", " ")
        self.input.style = {"description_width": LABEL_WIDTH}
        self.input.layout = w.Layout(width=f"calc({LABEL_WIDTH} + {INPUT_WIDTH})")
        if field.kind == "text":
            self.input.layout.height = "64px"
        set_tooltip(self.input, field.help)
        self.input.add_class(f"nbtune-field-{dotted.replace('.', '-').replace('_', '-')}")
        self.problem: str | None = None  # the validation message shown under the field
        self.message = w.HTML("", layout=w.Layout(display="none"))
        self.box = w.VBox([self.input, self.message], layout=w.Layout(margin="0"))
        self.input.observe(lambda _: on_change(), names="value")

    @property
    def value(self) -> Any:
        raw = self.input.value
        if raw == AUTO and self.field.kind == "choice":
            return None
        return parse_value(self.field, raw)

    def set(self, value: Any) -> None:
        shown = display_value(self.field, value)
        if self.field.kind == "choice" and value is None:
            shown = AUTO
        if isinstance(self.input, (w.IntText, w.FloatText)):
            if not isinstance(shown, (int, float)) or isinstance(shown, bool):
                return  # a required number the form cannot show; the config it came from was invalid anyway
        elif isinstance(self.input, (w.Text, w.Textarea)):
            shown = "" if shown is None else str(shown)
        self.input.value = shown

    def show_problem(self, message: str | None) -> None:
        self.problem = message
        if message:
            self.message.value = f"<div class='nbtune-message'>⚠ {html.escape(message)}</div>"
            self.message.layout.display = ""
            self.input.add_class("nbtune-invalid")
        else:
            self.message.value = ""
            self.message.layout.display = "none"
            self.input.remove_class("nbtune-invalid")


def parse_value(field: Field, raw: Any) -> Any:
    """A form control's value as the config wants it. Text that cannot be parsed is kept as text, so the
    config's validation names the field and the bad value; multi-line text is kept as typed."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if field.kind in ("str-list", "int-list"):
        items = [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
        if field.kind == "int-list":
            items = [int(i) if i.lstrip("-").isdigit() else i for i in items]  # type: ignore[misc]
        return None if not items and field.optional else items
    if text == "" and field.optional:
        return None
    if field.kind in ("int", "float", "str-or-float"):
        try:
            number = float(text)
        except ValueError:
            return text if text or field.kind == "str-or-float" else raw
        return int(number) if field.kind == "int" and number.is_integer() else number
    return raw if field.kind == "text" else text


def display_value(field: Field, value: Any) -> Any:
    """A config value as a form control shows it (lists as comma-separated text, None as empty text)."""
    if field.kind in ("str-list", "int-list"):
        return ", ".join(str(v) for v in value or [])
    if value is None and field.kind in ("int", "float", "str", "text", "str-or-float"):
        return ""
    return value


def _make_input(field: Field, value: Any) -> Any:
    kind = field.kind
    if kind == "bool":
        return w.Checkbox(value=bool(value), indent=True)
    if kind == "choice":
        options = [(str(c), c) for c in field.choices]
        if field.optional:
            options.insert(0, (AUTO, AUTO))
        chosen = AUTO if value is None and field.optional else value
        if chosen not in [o[1] for o in options]:
            options.append((str(chosen), chosen))
        return w.Dropdown(options=options, value=chosen)
    if kind == "int" and not field.optional and isinstance(value, int):
        return w.IntText(value=value)
    if kind == "float" and not field.optional and isinstance(value, (int, float)):
        return w.FloatText(value=value)
    placeholder = "auto" if field.optional else ""
    if kind in ("str-list", "int-list"):
        placeholder = "comma-separated" + (" (empty: auto)" if field.optional else "")
    text = "" if value is None else str(value)
    if field.kind == "text":
        return w.Textarea(value=text, placeholder=placeholder)
    return w.Text(value=text, placeholder=placeholder, continuous_update=False)
