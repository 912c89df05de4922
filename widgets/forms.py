"""Form controls generated from field descriptions (a method's registry fields, or a config section's fields).

One `FieldControl` per field: the input that suits the field's kind (a choice under the labels its caller
gives, if any; a list of names as a multi-choice of what its caller offers; a mapping as YAML or JSON text), its
help as the tooltip, and a message line that shows the field's validation problem. No form is ever written by
hand for one method.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ipywidgets as w
from nbtune.widgets.environment import set_tooltip

from nbtune.methods.registry import Field

LABEL_WIDTH = "190px"  # "gradient accumulation steps" fits; longer labels (peft's generated fields) wrap
INPUT_MAX_WIDTH = "580px"  # a control takes its column's width up to this
AUTO = "(auto)"
MAPPING_HINT = "YAML or JSON: one name: value a line (empty: none)"

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
                 option_labels: Mapping[Any, str] | None = None, multi_choice: bool = False):
        """`multi_choice`: a list of names is picked from the names `offer` gives (and those `value` holds)."""
        self.dotted = dotted
        self.field = field
        self.offered: tuple[Any, ...] = ()  # a multi-choice's names to pick from, besides those chosen
        self._unoffered = ""
        self._muted = False  # the options are being replaced: not the user's change
        if multi_choice:
            self.input: Any = w.SelectMultiple(options=list(value or []), value=tuple(value or []), rows=2)
        else:
            self.input = _make_input(field, display_value(field, value), option_labels or {})
        self.input.description = field.name.replace("_", " ")
        self.input.style = {"description_width": LABEL_WIDTH}
        self.input.layout = w.Layout(width="100%", max_width=INPUT_MAX_WIDTH)
        if field.kind in ("text", "mapping"):
            self.input.layout.height = "64px"
        set_tooltip(self.input, field.help)
        self.input.add_class(f"nbtune-field-{dotted.replace('.', '-').replace('_', '-')}")
        self.problem: str | None = None  # the validation message shown under the field
        self.message = w.HTML("", layout=w.Layout(display="none"))
        self.box = w.VBox([self.input, self.message], layout=w.Layout(margin="0"))
        self.input.observe(lambda _: self._muted or on_change(), names="value")

    @property
    def value(self) -> Any:
        raw = self.input.value
        if isinstance(self.input, w.SelectMultiple):
            return list(raw)
        if raw == AUTO and self.field.kind == "choice":
            return None
        return parse_value(self.field, raw)

    def offer(self, names: Iterable[Any], unoffered: str = "") -> None:
        """A multi-choice's names to pick from; chosen names stay chosen, those not among `names` shown as
        "name (unoffered)" where it is given ("not installed here"). No change is reported: the value is the same."""
        self.offered, self._unoffered = tuple(names), unoffered
        self._show_options(tuple(self.input.value))

    def _show_options(self, chosen: tuple[Any, ...]) -> None:
        names = [*self.offered, *(c for c in chosen if c not in self.offered)]
        labels = {n: f"{n} ({self._unoffered})" if self._unoffered and n not in self.offered else str(n)
                  for n in names}
        self._muted = True
        try:
            self.input.options = [(labels[n], n) for n in names]
            self.input.rows = min(max(len(names), 2), 6)  # a list box (one row draws as a dropdown)
            self.input.value = chosen
        finally:
            self._muted = False

    def set(self, value: Any) -> None:
        if isinstance(self.input, w.SelectMultiple):
            chosen = tuple(value) if isinstance(value, (list, tuple)) else ()
            self._show_options(chosen)
            return
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
        reason = parse_mapping(self.input.value)[1] if message and self.field.kind == "mapping" else None
        if reason:  # the text is not a mapping: say why (where YAML stopped) rather than repeat the text
            words = f"{self.label} must be a mapping of names to values: {reason}"
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
    if field.kind == "mapping":
        mapping = parse_mapping(raw)[0]
        return raw if mapping is None else mapping
    if text == "" and field.optional:
        return None
    if field.kind in ("int", "float", "str-or-float"):
        try:
            number = float(text)
        except ValueError:
            return text if text or field.kind == "str-or-float" else raw
        return int(number) if field.kind == "int" and number.is_integer() else number
    return raw if field.kind == "text" else text


def parse_mapping(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(mapping, None) from YAML or JSON text (empty text or only comments: {}), else (None, why not, in
    words: where the YAML stopped, or what the text reads as instead). Read with the config's bounds."""
    import yaml

    from nbtune.config import ConfigError, read_yaml

    if not isinstance(text, str):
        return (text, None) if isinstance(text, dict) else (None, f"got {text!r}")
    try:
        value = read_yaml(text)
    except ConfigError as err:
        return None, err.problems[0][1]
    except yaml.YAMLError as err:
        return None, f"not valid YAML or JSON: {_yaml_reason(err)}"
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        return None, f"the text reads as {type(value).__name__} {value!r}, not as name: value pairs"
    return value, None


def _yaml_reason(err: Exception) -> str:
    """A YAML syntax error in a line: what was wrong and where (line and column counted from 1)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem is None:
        return str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def described_choices(field: Field) -> dict[Any, str]:
    """Each choice's words where the field's help describes every choice as "name (words)", else {}:
    distributed.strategy's help says "ddp (each holds the whole model and its optimizer; ...)"."""
    words = {}
    for choice in field.choices:
        found = re.search(rf"(?<![\w-]){re.escape(str(choice))} \(([^()]*)\)", field.help)
        if found is None:
            return {}
        words[choice] = found.group(1)
    return words


def display_value(field: Field, value: Any) -> Any:
    """A config value as a form control shows it (lists as comma-separated text, a mapping as JSON, which YAML
    reads back as it was, None as empty text)."""
    if field.kind in ("str-list", "int-list"):
        return ", ".join(str(v) for v in value or [])
    if field.kind == "mapping":
        return "" if not value else json.dumps(value, default=str) if isinstance(value, dict) else str(value)
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
    if kind == "mapping":
        return w.Textarea(value=text, placeholder=MAPPING_HINT, continuous_update=True)
    if field.kind == "text":
        return w.Textarea(value=text, placeholder=placeholder, continuous_update=True)
    return w.Text(value=text, placeholder=placeholder, continuous_update=True)
