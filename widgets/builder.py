"""The config builder: a form over a TuneConfig with inline validation, data preview, memory panel, code/YAML
export and import, and Launch, which opens the run's dashboard under the builder.

The form appears at once: its first display needs only the built-in methods (pure data). The methods generated
from the installed peft (importing peft, torch, transformers: seconds) join the method dropdown from a
background thread after the first display, and the memory panel says it is estimating until its first estimate
lands; `builder.wait_loaded()` blocks until both have arrived.

`Builder(config)` starts from a config; `builder.config` reads the form back as a TuneConfig. The method's own
fields are generated from the method registry, never written per method; every rule is the config's own
validation (`TuneConfig.problems`), shown next to the field it names.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterable
from typing import Any

import ipywidgets as w
from IPython.display import display
from nbtune.widgets import environment
from nbtune.widgets.forms import STYLE, FieldControl
from nbtune.widgets.memory_panel import DEFAULT_GPU, MemoryPanel

from nbtune.config import ConfigError, TuneConfig, config_from_values, section_fields
from nbtune.methods import registry
from nbtune.precision import precision_here

SECTION_TITLES = ("Model", "Task", "Data", "Method", "Training")


class Builder:
    """An interactive form for a TuneConfig. Display it as the last line of a cell."""

    def __init__(self, config: TuneConfig | None = None, store: Any = None, gpu: str = DEFAULT_GPU,
                 debounce_s: float = 0.3):
        config = config if config is not None else TuneConfig()
        self.store = store
        self.run: Any = None
        self.dashboard: Any = None
        self.problems: list[tuple[str, str]] = []
        self._config: TuneConfig | None = config
        self._rows: list[dict[str, Any]] | None = None  # in-memory data rows (not editable as text)
        self._quiet = False
        self._slots: list[Any] | None = None
        self.controls: dict[str, FieldControl] = {}
        self._form_lock = threading.RLock()  # the method dropdown changes from the loader thread and the user
        self._loader: threading.Thread | None = None
        self.methods_loaded = threading.Event()  # the generated peft entries are in the dropdown
        self.methods = _methods_for(config.method.name)

        self.sections = self._make_sections(config)
        self.memory = MemoryPanel(gpu=gpu, debounce_s=debounce_s, on_apply=self.apply)
        self.status = w.HTML("")
        self.launch_button = w.Button(description="Launch", icon="play", button_style="success",
                                      layout=w.Layout(width="130px"))
        environment.set_tooltip(self.launch_button, "Start training this config; its dashboard opens below.")
        self.launch_button.on_click(lambda _: self.launch())
        self.exports = self._make_exports()

        header = w.HTML(f"{STYLE}<div style='font-size:15px;margin-bottom:4px'><b>nbtune</b> · fine-tuning "
                        "builder</div>")
        actions = w.HBox([self.launch_button, self.status], layout=w.Layout(align_items="center", gap="12px",
                                                                            margin="8px 0"))
        self.box = w.VBox([header, w.HBox([self.sections, self.memory.box]), actions, self.exports],
                          layout=w.Layout(padding="4px"))
        self.box.add_class("nbtune-builder")
        self.set_config(config)

    # ----- the parts of the form ------------------------------------------------------------------------------
    def _make_sections(self, config: TuneConfig) -> Any:
        """The tabs: Model, Task, Data (with its preview), Method (dropdown and fields), Training."""
        model = self._section("model", exclude=("task",))
        task = self._section("model", only=("task",))
        data = self._section("data")
        training = self._section("training")
        self.precision_note = w.HTML("")  # what precision auto (or the choice) becomes on this machine, and why
        training.insert(training.index(self.controls["training.precision"].box) + 1, self.precision_note)

        self.preview_button = w.Button(description="Preview data", icon="table", layout=w.Layout(width="150px"))
        environment.set_tooltip(self.preview_button, "Load the first rows, apply the template and tokenize.")
        self.preview_button.on_click(lambda _: self.preview())
        self.preview_out = w.HTML("")
        self.task_note = w.HTML("")
        children = [w.VBox(model), w.VBox([*task, self.task_note]),
                    w.VBox([*data, w.HBox([self.preview_button]), self.preview_out]),
                    self._make_method_tab(config), w.VBox(training)]
        sections = w.Tab(children=children, layout=w.Layout(width="600px"))
        for i, title in enumerate(SECTION_TITLES):
            sections.set_title(i, title)
        sections.selected_index = SECTION_TITLES.index("Method")
        return sections

    def _make_method_tab(self, config: TuneConfig) -> Any:
        """The method dropdown, the note while peft's methods load, and the chosen method's own fields."""
        self.method = w.Dropdown(
            options=_method_options(self.methods), value=config.method.name, description="method",
            style={"description_width": "170px"}, layout=w.Layout(width="530px"))
        environment.set_tooltip(self.method, "The tuning method; its own settings appear below.")
        self.methods_note = w.HTML("" if registry.generated_loaded() else
                                   "<div class='nbtune-section-note' style='margin-left:176px'>Loading the other "
                                   "methods of your installed peft…</div>")
        if registry.generated_loaded():
            self.methods_loaded.set()
        self.method_info = w.HTML("")
        self.method_fields = w.VBox([])
        self._swapping = False  # the dropdown's options are being replaced; its value is not the user's choice
        self.method.observe(lambda change: self._swapping or self._switch_method(change["new"]), names="value")
        self._build_method_fields(config.method.name, config.method_params)
        return w.VBox([self.method, self.methods_note, self.method_info, self.method_fields])

    def _make_exports(self) -> Any:
        """The "Code & YAML" accordion: copy as code, the YAML, and a YAML to load into the form."""
        self.code = w.Textarea(layout=w.Layout(width="100%", height="200px"))
        self.yaml = w.Textarea(layout=w.Layout(width="100%", height="200px"))
        self.load_text = w.Textarea(placeholder="Paste a YAML config here, then Load into form.",
                                    layout=w.Layout(width="100%", height="160px"))
        self.load_button = w.Button(description="Load into form", icon="upload", layout=w.Layout(width="150px"))
        self.load_button.on_click(lambda _: self.load_yaml(self.load_text.value))
        self.load_message = w.HTML("")
        tabs = w.Tab(children=[
            w.VBox([w.HTML("<span class='nbtune-help'>A runnable cell (nbtune API); select and copy.</span>"),
                    self.code]),
            w.VBox([w.HTML("<span class='nbtune-help'>The config as YAML (use with <code>%%nbtune</code>).</span>"),
                    self.yaml]),
            w.VBox([self.load_text, w.HBox([self.load_button, self.load_message])]),
        ])
        for i, title in enumerate(("Copy as code", "YAML", "Load YAML")):
            tabs.set_title(i, title)
        exports = w.Accordion(children=[tabs], selected_index=None, layout=w.Layout(width="1014px"))
        exports.set_title(0, "Code & YAML")
        return exports

    # ----- display --------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        environment.prepare_frontend()
        display(self.box)
        # Three outputs under the builder that a launched run's dashboard fills (and leaves its record in).
        self._slots = [display({"text/plain": ""}, raw=True, display_id=True) for _ in range(3)]
        self.load_in_background()

    # ----- what loads after the first display -----------------------------------------------------------------
    def load_in_background(self) -> None:
        """Start (once) a thread that draws the first estimate, then loads the generated peft methods."""
        with self._form_lock:
            if self._loader is not None:
                return
            self._loader = threading.Thread(target=self._load_rest, name="nbtune-builder-load", daemon=True)
            self._loader.start()

    def _load_rest(self) -> None:
        # One import storm at a time, the one the user waits for first: the estimate imports transformers,
        # peft then finds it imported.
        if not self.memory.wait(0):
            self.memory.update(self.memory.config, at_once=True)
        if self.methods_loaded.is_set():
            return
        try:
            methods = registry.all_methods()
        except Exception as err:  # a broken peft install: the built-in methods still work
            self.methods_note.value = (f"<div class='nbtune-section-note' style='margin-left:176px;color:#c62828'>"
                                       f"The methods generated from peft could not be loaded: "
                                       f"{html.escape(f'{type(err).__name__}: {err}')}</div>")
            self.methods_loaded.set()
            return
        self._list_methods(methods)

    def _list_methods(self, methods: list[registry.Method]) -> None:
        """Offer these methods in the dropdown; the chosen method and its fields stay as they are."""
        with self._form_lock:
            self.methods = methods
            chosen, self._swapping = self.method.value, True
            try:
                self.method.options = _method_options(methods)
                self.method.value = chosen
            finally:
                self._swapping = False
            self.task_note.value = _task_note(self.methods, self._config)
        if registry.generated_loaded():
            self.methods_note.value = ""
            self.methods_loaded.set()

    def _select_method(self, name: str) -> None:
        """Choose a method in the dropdown, loading the generated entries first when it is one of them."""
        if all(m.name != name for m in self.methods):
            registry.get(name)  # names the allowed methods when there is no such method
            self._list_methods(registry.all_methods())
        self.method.value = name

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the generated methods are in the dropdown and the first estimate is drawn (starting the
        loading if the builder was never displayed); False if `timeout` seconds passed first."""
        self.load_in_background()
        return self.methods_loaded.wait(timeout) and self.memory.wait(timeout)

    # ----- the form <-> config --------------------------------------------------------------------------------
    def _section(self, section: str, only: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Any]:
        boxes = []
        for field in section_fields(section):
            if (only and field.name not in only) or field.name in exclude:
                continue
            dotted = f"{section}.{field.name}"
            control = FieldControl(dotted, field, field.default, self._changed)
            self.controls[dotted] = control
            boxes.append(control.box)
        return boxes

    def _build_method_fields(self, name: str, values: dict[str, Any]) -> None:
        method = registry.get(name)
        for dotted in [d for d in self.controls if d.startswith("method.")]:
            del self.controls[dotted]
        boxes = []
        for field in method.fields:
            control = FieldControl(f"method.{field.name}", field, values.get(field.name, field.default), self._changed)
            self.controls[control.dotted] = control
            boxes.append(control.box)
        if not boxes:
            boxes.append(w.HTML("<span class='nbtune-help'>This method has no settings of its own.</span>"))
        self.method_fields.children = tuple(boxes)
        paper = f" · <a href='{html.escape(method.paper)}' target='_blank'>paper</a>" if method.paper.startswith(
            "http") else (f" · {html.escape(method.paper)}" if method.paper else "")
        self.method_info.value = (f"<div class='nbtune-section-note' style='margin-left:176px'><b>"
                                  f"{html.escape(method.title)}</b> ({html.escape(method.family)}){paper}<br>"
                                  f"{html.escape(method.description)}<br>Recommended learning rate "
                                  f"{method.learning_rate:g} · tasks: {', '.join(method.tasks)}</div>")
        lr = self.controls.get("training.learning_rate")
        if lr is not None:
            lr.input.placeholder = f"auto: {method.learning_rate:g} for {name}"

    def _switch_method(self, name: str) -> None:
        """Swap the method's fields; values of fields the new method shares are kept when still valid."""
        with self._form_lock:
            old = {d.split(".", 1)[1]: c.value for d, c in self.controls.items() if d.startswith("method.")}
            method = registry.get(name)
            keep = {f.name: old[f.name] for f in method.fields if f.name in old and f.check(old[f.name]) is None}
            self._build_method_fields(name, keep)
        self._changed()

    def values(self) -> dict[str, Any]:
        """The form as dotted-name values (method parameters only where they differ from the defaults)."""
        out: dict[str, Any] = {}
        for dotted, control in self.controls.items():
            if dotted.startswith("method."):
                if control.value != control.field.default:
                    out[dotted] = control.value
            else:
                out[dotted] = control.value
        if self._rows is not None:
            out["data.source"] = self._rows
        out["method.name"] = self.method.value
        return out

    @property
    def config(self) -> TuneConfig:
        """The form as a TuneConfig; raises ConfigError listing every problem when the form is invalid."""
        config, problems = config_from_values(self.values())
        if config is None:
            raise ConfigError(problems)
        return config

    def set_config(self, config: TuneConfig) -> None:
        """Fill the form from a config."""
        self._quiet = True
        try:
            source = config.data.source
            self._rows = source if isinstance(source, list) else None
            for section in ("model", "data", "training"):
                values = getattr(config, section)
                for field in section_fields(section):
                    self.controls[f"{section}.{field.name}"].set(getattr(values, field.name))
            source_control = self.controls["data.source"]
            source_control.input.disabled = self._rows is not None
            if self._rows is not None:
                source_control.input.value = f"<{len(self._rows)} in-memory rows>"
            if self.method.value != config.method.name:
                self._select_method(config.method.name)
            self._build_method_fields(config.method.name, config.method_params)
        finally:
            self._quiet = False
        self._changed()

    def apply(self, changes: dict[str, Any]) -> None:
        """Apply dotted-field changes to the form (a memory suggestion, or code): {"training.micro_batch_size": 4}."""
        self._quiet = True
        try:
            if "method" in changes or "method.name" in changes:
                name = changes.get("method.name", changes.get("method"))
                self._select_method(name)
                self._build_method_fields(name, {})
            for dotted, value in changes.items():
                if dotted in ("method", "method.name"):
                    continue
                if dotted not in self.controls:
                    raise KeyError(f"{dotted} is not a field of the form")
                self.controls[dotted].set(value)
        finally:
            self._quiet = False
        self._changed()

    def _changed(self) -> None:
        """Validate the whole form, mark every problem at its field, gate Launch, refresh estimate and code."""
        if self._quiet:
            return
        config, problems = config_from_values(self.values())
        self._config, self.problems = config, problems
        by_field: dict[str, str] = {}
        for name, message in problems:
            by_field.setdefault(name, message)
        for dotted, control in self.controls.items():
            control.show_problem(by_field.pop(dotted, None))
        self.launch_button.disabled = config is None
        if config is None:
            unplaced = "".join(f"<br>{html.escape(m)}" for m in by_field.values())
            count = len(problems)
            self.status.value = (f"<span style='color:#c62828'>⚠ {count} problem{'s' if count > 1 else ''} to fix "
                                 f"before launching{unplaced}</span>")
        else:
            self.status.value = ("<span style='color:#2e7d32'>✔ Ready</span> <span class='nbtune-help'>"
                                 f"{html.escape(config.method.name)} on {html.escape(config.model.name_or_path)}, "
                                 f"lr {config.learning_rate:g}</span>")
            self.code.value = config.to_code()
            self.yaml.value = config.to_yaml()
        self.task_note.value = _task_note(self.methods, config)
        if config is not None:
            self.precision_note.value = ("<div class='nbtune-section-note' style='margin-left:176px'>here: "
                                         f"{html.escape(precision_here(config).reason)}</div>")
        self.memory.update(config)

    def load_yaml(self, text: str) -> None:
        """Fill the form from YAML text (the Load YAML tab)."""
        try:
            config = TuneConfig.from_yaml(text)
        except ConfigError as err:
            self.load_message.value = f"<span style='color:#c62828'>{html.escape(str(err))}</span>"
            return
        except Exception as err:  # YAML syntax
            self.load_message.value = f"<span style='color:#c62828'>Not valid YAML: {html.escape(str(err))}</span>"
            return
        self.set_config(config)
        self.load_message.value = "<span style='color:#2e7d32'>✔ Loaded into the form</span>"

    # ----- data preview ---------------------------------------------------------------------------------------
    def preview(self) -> dict[str, Any] | None:
        """Show the first rows after the template, row counts, the token-length histogram and truncation."""
        if self._config is None:
            self.preview_out.value = "<span style='color:#c62828'>Fix the marked fields first.</span>"
            return None
        self.preview_out.value = "<span class='nbtune-help'>Loading the data and the tokenizer…</span>"
        try:
            result = data_preview(self._config)
        except Exception as err:
            self.preview_out.value = f"<span style='color:#c62828'>{html.escape(str(err))}</span>"
            return None
        self.preview_out.value = preview_html(result)
        return result

    # ----- launching ------------------------------------------------------------------------------------------
    def launch(self) -> Any:
        """Start a run of the form's config and open its dashboard under the builder; returns the Run."""
        from nbtune.widgets.dashboard import Dashboard

        import nbtune

        config = self.config
        self.run = nbtune.launch(config, store=self.store)
        if self.dashboard is not None:  # one dashboard under the builder: the newest run's
            self.dashboard.release()
        self.dashboard = Dashboard(self.run, widgets=True)
        if self._slots is not None:
            self.dashboard.show(self._slots)
        return self.run


def _methods_for(name: str) -> list[registry.Method]:
    """The dropdown's first methods: every one when they are loaded already or the config starts from a
    generated method (its fields are needed now), else the built-in ones (pure data, no peft import)."""
    built_in = registry.all_methods(include_generated=False)
    if registry.generated_loaded() or all(m.name != name for m in built_in):
        return registry.all_methods()
    return built_in


def _method_options(methods: list[registry.Method]) -> list[tuple[str, str]]:
    return [(f"{m.name} — {m.description}", m.name) for m in methods]


def _task_note(methods: list[registry.Method], config: TuneConfig | None) -> str:
    if config is None:
        return ""
    supported = ", ".join(m.name for m in methods if config.model.task in m.tasks)
    return f"<div class='nbtune-section-note'>Methods for this task: {html.escape(supported)}</div>"


def data_preview(config: TuneConfig, rows: int = 5) -> dict[str, Any]:
    """What the data preview shows: the engine's preview of the first rows, with a token-length histogram."""
    from nbtune import data, models

    result = data.preview(config, tokenizer=models.load_tokenizer(config), rows=rows)
    result["histogram"] = histogram(result.get("token_lengths") or [])
    result["max_length"] = config.data.max_length
    return result


def histogram(values: Iterable[float], bins: int = 20) -> list[tuple[float, float, int]]:
    """(low, high, count) per bin over the values' range."""
    values = list(values)
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        return [(lo, hi, len(values))]
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def preview_html(result: dict[str, Any]) -> str:
    """The data preview: rows as the model sees them, counts, a token-length histogram with max_length marked."""
    rows = result.get("rows") or []
    has_label = any(r.get("label") is not None for r in rows)
    head = "<tr><th>input (after the template)</th><th>" + ("label" if has_label else "target") + "</th></tr>"
    body = "".join(
        f"<tr><td style='white-space:pre-wrap;text-align:left;font-family:monospace'>{html.escape(str(r['input']))}"
        f"</td><td style='text-align:left;font-family:monospace'>"
        f"{html.escape(str(r['label'] if has_label else r.get('target') or ''))}</td></tr>" for r in rows)
    counts = (f"<b>{result.get('train_rows', 0):,}</b> training rows · <b>{result.get('eval_rows', 0):,}</b> "
              "evaluation rows")
    truncated = result.get("truncated")
    max_length = result.get("max_length")
    trunc = ""
    if truncated is not None:
        color = "#c62828" if truncated else "#2e7d32"
        trunc = (f" · <span style='color:{color}'>{truncated:,} row{'s' if truncated != 1 else ''} longer than "
                 f"max_length {max_length} (truncated)</span>")
    return (f"<div style='margin-top:6px'>{counts}{trunc}</div>"
            f"<table style='font-size:12px;margin:6px 0'>{head}{body}</table>"
            f"{histogram_html(result.get('histogram') or [], max_length)}")


def histogram_html(bins: list[tuple[float, float, int]], max_length: int | None) -> str:
    if not bins:
        return ""
    peak = max(c for _, _, c in bins) or 1
    lo, hi = bins[0][0], bins[-1][1]
    bars = "".join(
        f"<div title='{a:.0f}–{b:.0f} tokens: {c} rows' style='flex:1;margin:0 1px;height:{100 * c / peak:.1f}%;"
        f"background:{'#c62828' if max_length is not None and a >= max_length else '#1565c0'}'></div>"
        for a, b, c in bins)
    return (f"<div class='nbtune-help'>Token lengths (prompt + target), {lo:.0f}–{hi:.0f} tokens"
            f"{f'; max_length {max_length}' if max_length else ''}</div>"
            f"<div style='display:flex;align-items:flex-end;height:70px;width:420px;border-bottom:1px solid #9e9e9e'>"
            f"{bars}</div>")

