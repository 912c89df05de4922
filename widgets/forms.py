"""Form controls generated from field descriptions (a method's registry fields, or a config section's fields).

One `FieldControl` per field: the input that suits the field's kind (a choice under the labels its caller
gives, if any), its help as the tooltip, and a message line that shows the field's validation problem. No form is ever written by hand for one method.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w
from nbtune.widgets.environment import set_tooltip

from nbtune.methods.registry import Field

LABEL_WIDTH = "190px"  # "gradient accumulation steps" fits; longer labels (peft's generated fields) wrap
INPUT_MAX_WIDTH = "580px"  # a control takes its column's width up to this
AUTO = "(auto)"

# Injected once with the builder (the live widget renders it): how an invalid field looks, labels that wrap instead
# of being cut, and the static copy of the builder hidden where the live one shows (works in Lab, Notebook 7,
# VS Code and Colab; ipywidgets 7 and 8 use the same class names).
STYLE = """<style>
.nbtune-invalid input, .nbtune-invalid textarea, .nbtune-invalid select { border-color: #c62828 !important;
  background: #fff5f5 !important; }
.nbtune-message { color: #c62828; font-size: 12px; margin: -2px 0 4px 196px; line-height: 1.3; }
.nbtune-path { color: #9e9e9e; font-size: 11px; font-family: monospace; margin-left: 6px; }
.nbtune-help { color: #616161; font-size: 12px; }
.nbtune-cost { color: #757575; font-size: 11px; }
.nbtune-indented { margin-left: 196px; }
.nbtune-section-note { color: #424242; font-size: 12px; margin: 2px 0 6px 0; line-height: 1.45; }
.nbtune-builder .widget-html-content { line-height: 1.45; }
.nbtune-builder .widget-inline-hbox { height: auto; min-height: var(--jp-widgets-inline-height, 28px); }
.nbtune-builder .widget-inline-hbox > .widget-label { white-space: normal; overflow-wrap: anywhere;
  line-height: 1.2; height: auto; align-self: center; }
.nbtune-builder .widget-dropdown > select { text-overflow: ellipsis; }
.nbtune-columns { gap: 12px; }
.nbtune-actions { gap: 12px; }
.nbtune-suggestion { gap: 8px; }
.nbtune-static-builder, .nbtune-static-try-it { display: none; }
</style>"""


class FieldControl:
    """The input for one field; `value` reads it as the config wants it, `show_problem` marks it."""

    def __init__(self, dotted: str, field: Field, value: Any, on_change: Callable[[], None],
                 option_labels: Mapping[Any, str] | None = None):
        self.dotted = dotted
        self.field = field
        self.input = _make_input(field, display_value(field, value), option_labels or {})
        self.input.description = field.name.replace("_", " ")
        self.input.style = {"description_width": LABEL_WIDTH}
        self.input.layout = w.Layout(width="100%", max_width=INPUT_MAX_WIDTH)
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

    @property
    def label(self) -> str:
        """The field's name as the form shows it ("learning rate")."""
        return str(self.input.description)

    def show_problem(self, message: str | None, words: str | None = None) -> None:
        """Mark the field with the config's `message` (kept in `problem`), shown as `words` (the message in the
        form's labels) with the config path in small grey type."""
        self.problem = message
        if message:
            self.message.value = (f"<div class='nbtune-message'>⚠ {html.escape(words or message)}"
                                  f"<span class='nbtune-path'>{html.escape(self.dotted)}</span></div>")
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


def _make_input(field: Field, value: Any, option_labels: Mapping[Any, str]) -> Any:
    kind = field.kind
    if kind == "bool":
        return w.Checkbox(value=bool(value), indent=True)
    if kind == "choice":  # each choice under its label where the caller gives one (a stage's title)
        options = [(option_labels.get(c, str(c)), c) for c in field.choices]
        if field.optional:
            options.insert(0, (AUTO, AUTO))
        chosen = AUTO if value is None and field.optional else value
        if chosen not in [o[1] for o in options]:
            options.append((str(chosen), chosen))
        return w.Dropdown(options=options, value=chosen)
    # Every input reports each keystroke (the memory panel debounces), not only when it loses focus.
    if kind == "int" and not field.optional and isinstance(value, int):
        return w.IntText(value=value, continuous_update=True)
    if kind == "float" and not field.optional and isinstance(value, (int, float)):
        return w.FloatText(value=value, continuous_update=True)
    placeholder = "auto" if field.optional else ""
    if kind in ("str-list", "int-list"):
        placeholder = "comma-separated" + (" (empty: auto)" if field.optional else "")
    text = "" if value is None else str(value)
    if field.kind == "text":
        return w.Textarea(value=text, placeholder=placeholder, continuous_update=True)
    return w.Text(value=text, placeholder=placeholder, continuous_update=True)
