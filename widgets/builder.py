"""The config builder: a form over a TuneConfig with inline validation, data preview, memory panel, code/YAML
export and import, and Launch, which opens the run's dashboard right under it.

The form appears at once: its first display needs only the built-in methods (pure data). The methods generated
from the installed peft (importing peft, torch, transformers: seconds) join the method dropdown from a
background thread after the first display, then the experiment trackers installed here join training.report_to's
choices; the memory panel says it is estimating until its first estimate lands; `builder.wait_loaded()` blocks
until all three have arrived.

`Builder(config)` starts from a config; `builder.config` reads the form back as a TuneConfig. The method's own
fields are generated from the method registry, never written per method; every rule is the config's own
validation (`TuneConfig.problems`), shown next to the field it names in the form's words. "Ready" means the config
can run: valid, and nothing in `nbtune.preflight.readiness` in the way (the GPU's memory, the model's files, the
precision); what reads files or the hub is judged when the estimate lands, on the estimate's thread.
Choosing a task on the Task tab swaps a built-in model or dataset of another task for the task's own built-in
ones (image-to-text: nbtune:tiny-captioner on nbtune:shape-captions); a model or data of the user's own stays.

Displayed, the builder leaves one more output: a static copy of its config and estimate that a saved notebook
shows without a kernel, hidden by the builder's STYLE where the live form renders.
"""

from __future__ import annotations

import html
import threading
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from IPython.display import display
from nbtune.widgets import environment, status
from nbtune.widgets.data_preview import data_preview, preview_html
from nbtune.widgets.forms import INPUT_MAX_WIDTH, LABEL_WIDTH, STYLE, FieldControl, described_choices
from nbtune.widgets.memory_panel import DEFAULT_GPU, MemoryPanel, estimate_html

from nbtune import distributed, embedded, preflight, stages
from nbtune._lazy import import_heavy
from nbtune.config import ConfigError, TuneConfig, config_from_values, describe_source, section_fields
from nbtune.methods import registry
from nbtune.precision import precision_here

if TYPE_CHECKING:
    from nbtune.estimator.estimate import MemoryEstimate

SECTION_TITLES = status.TABS
LAUNCH_HELP = "Start training this config; its dashboard opens right below."
OPTION_LABELS = {"training.stage": {s.name: s.title for s in stages.STAGES.values()}}  # dropdowns in words
MULTI_CHOICE = ("training.report_to",)  # lists of names picked from what is installed here
FORM_SECTIONS = ("model", "data", "training", "distributed")  # the config sections the form shows field by field
FSDP_ONLY = ("sharding",)  # distributed fields only FSDP reads (nbtune/distributed.py `problems`)
OFFLOAD_ONLY = ("cpu_offload",)  # distributed fields only strategies that can offload read
PLAIN = "nbtune builder (the live form needs a running kernel; a static copy of its config follows)"
# The built-in model of each task (nbtune/embedded): choosing a task in the form swaps a built-in model or dataset
# of another task for the new task's; a model or data of the user's own stays as it is.
BUILT_IN_MODELS = {"causal-lm": embedded.EMBEDDED_MODEL, "seq-cls": embedded.EMBEDDED_MODEL,
                   "image-cls": embedded.VISION_MODEL, "image-to-text": embedded.CAPTION_MODEL,
                   "text-to-image": embedded.DIFFUSION_MODEL}


class Builder:
    """An interactive form for a TuneConfig. Display it as the last line of a cell."""

    def __init__(self, config: TuneConfig | None = None, store: Any = None, gpu: str = DEFAULT_GPU,
                 debounce_s: float = 0.3):
        config = config if config is not None else TuneConfig()
        self.store = store
        self.run: Any = None
        self.dashboard: Any = None
        self.problems: list[tuple[str, str]] = []  # (dotted field, the config's message) of an invalid form
        self.blockers: list[preflight.Blocker] = []  # why a valid config would not run (empty: Ready)
        self.ready = False
        self._config: TuneConfig | None = config
        self._status_lock = threading.RLock()  # the status changes on each keystroke and when an estimate lands
        self._record: Any = None  # the display handle of the static copy
        self._rows: Any = None  # in-memory rows, or {split: rows} (not editable as text)
        self._quiet = False
        self._slots: list[Any] | None = None
        self.controls: dict[str, FieldControl] = {}
        self._form_lock = threading.RLock()  # the method dropdown changes from the loader thread and the user
        self._loader: threading.Thread | None = None
        self.methods_loaded = threading.Event()  # the generated peft entries are in the dropdown
        self.trackers_loaded = threading.Event()  # the trackers installed here are training.report_to's choices
        self.trackers: list[str] = []  # those trackers, once loaded
        self.methods = _methods_for(config.method.name)

        self.sections = self._make_sections(config)
        self.controls["model.task"].input.observe(lambda _: self._quiet or self._task_chosen(), names="value")
        self.memory = MemoryPanel(gpu=gpu, debounce_s=debounce_s, on_apply=self.apply,
                                  on_estimate=self._estimated)
        self.status = w.HTML("", layout=w.Layout(flex="1 1 auto", min_width="0"))
        self.launch_button = w.Button(description="Launch", icon="play", button_style="success",
                                      layout=w.Layout(width="130px", flex="0 0 auto"))
        environment.set_tooltip(self.launch_button, LAUNCH_HELP)
        self.launch_button.on_click(lambda _: self.launch())
        self.exports = self._make_exports()

        header = w.HTML(f"{STYLE}<div style='font-size:15px;margin-bottom:4px'><b>nbtune</b> · fine-tuning "
                        "builder</div>")
        # Form and memory panel side by side where there is room, the panel below where there is not.
        columns = w.Box([self.sections, self.memory.box], layout=w.Layout(
            display="flex", flex_flow="row wrap", align_items="flex-start", width="100%"))
        columns.add_class("nbtune-columns")
        # Launch last: the run's dashboard appears in the outputs right under it, where the user just clicked.
        actions = w.HBox([self.launch_button, self.status], layout=w.Layout(align_items="center", margin="8px 0"))
        actions.add_class("nbtune-actions")
        self.box = w.VBox([header, columns, self.exports, actions], layout=w.Layout(padding="4px", width="100%"))
        self.box.add_class("nbtune-builder")
        self.set_config(config)

    # ----- the parts of the form ------------------------------------------------------------------------------
    def _make_sections(self, config: TuneConfig) -> Any:
        """The tabs: Model, Task, Data (with its preview), Method (dropdown and fields), Training, Distributed."""
        model = self._section("model", exclude=("task",))
        task = self._section("model", only=("task",))
        data = self._section("data")
        training = self._section("training")
        self.precision_note = w.HTML("")  # what precision auto (or the choice) becomes on this machine, and why
        training.insert(training.index(self.controls["training.precision"].box) + 1, self.precision_note)
        self.stage_note = w.HTML("")  # the chosen stage in words: what it does and which trainer runs it
        training.insert(training.index(self.controls["training.stage"].box) + 1, self.stage_note)
        self.trackers_note = w.HTML(_note("Finding the experiment trackers installed here…"))
        training.insert(training.index(self.controls["training.report_to"].box) + 1, self.trackers_note)
        scale_out = self._section("distributed")
        self.distributed_note = w.HTML("")  # the chosen strategy in words, and what it makes of the batch
        scale_out.insert(scale_out.index(self.controls["distributed.strategy"].box) + 1, self.distributed_note)

        self.preview_button = w.Button(description="Preview data", icon="table", layout=w.Layout(width="150px"))
        environment.set_tooltip(self.preview_button, "Load the first rows, apply the template and tokenize.")
        self.preview_button.on_click(lambda _: self.preview())
        self.preview_out = w.HTML("")
        self.task_note = w.HTML("")
        self.switched: dict[str, Any] = {}  # the task last chosen and the built-in model and data it swapped in
        self.switch_note = w.HTML("")  # ... said in words while the form still holds them
        children = [w.VBox(model), w.VBox([*task, self.switch_note, self.task_note]),
                    w.VBox([*data, w.HBox([self.preview_button]), self.preview_out]),
                    self._make_method_tab(config), w.VBox(training), w.VBox(scale_out)]
        sections = w.Tab(children=children, layout=w.Layout(flex="1 1 540px", min_width="0", max_width="820px"))
        for i, title in enumerate(SECTION_TITLES):
            sections.set_title(i, title)
        sections.selected_index = SECTION_TITLES.index("Method")
        return sections

    def _make_method_tab(self, config: TuneConfig) -> Any:
        """The method dropdown, the note while peft's methods load, and the chosen method's own fields."""
        self.method = w.Dropdown(  # its options are long ("name — description"): as wide as the column allows
            options=_method_options(self.methods), value=config.method.name, description="method",
            style={"description_width": LABEL_WIDTH}, layout=w.Layout(width="100%", max_width=INPUT_MAX_WIDTH))
        environment.set_tooltip(self.method, "The tuning method; its own settings appear below.")
        self.methods_note = w.HTML("" if registry.generated_loaded() else
                                   "<div class='nbtune-section-note nbtune-indented'>Loading the other "
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
        exports = w.Accordion(children=[tabs], selected_index=None, layout=w.Layout(width="100%"))
        exports.set_title(0, "Code & YAML")
        return exports

    # ----- display --------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        environment.prepare_frontend()
        # Raw, so that where no widget renders (nbconvert, GitHub) the text says what it is, not `VBox(children=...`.
        display({**environment.view_bundle(self.box), "text/plain": PLAIN}, raw=True)
        self._record = display(self._static_copy(), raw=True, display_id=True)
        # Three outputs under the builder that a launched run's dashboard fills (and leaves its record in).
        self._slots = [display({"text/plain": ""}, raw=True, display_id=True) for _ in range(3)]
        self.load_in_background()

    def _static_copy(self, estimate: MemoryEstimate | None = None) -> dict[str, Any]:
        """What the saved notebook shows of the builder without a kernel: the config, status and estimate."""
        config = self._config
        if config is None:
            text = "nbtune builder: the form has problems to fix: " + ", ".join(n for n, _ in self.problems)
            return {"text/html": f"<div class='nbtune-static-builder'>{html.escape(text)}</div>", "text/plain": text}
        estimate = estimate or (self.memory.estimate if self.memory.wait(0) else None)
        table = estimate_html(estimate, self.memory.gpu.value, config.model.name_or_path) if estimate else ""
        return status.static_copy(config, self.status.value, table)

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
        if not self.methods_loaded.is_set():
            self._load_methods()
        if not self.trackers_loaded.is_set():
            self._load_trackers()

    def _load_methods(self) -> None:
        """Offer peft's generated methods too (or say why they could not be loaded)."""
        try:
            methods = registry.all_methods()
        except Exception as err:  # a broken peft install: the built-in methods still work
            self.methods_note.value = (f"<div class='nbtune-section-note nbtune-indented' style='color:#c62828'>"
                                       f"The methods generated from peft could not be loaded: "
                                       f"{html.escape(f'{type(err).__name__}: {err}')}</div>")
            self.methods_loaded.set()
            return
        self._list_methods(methods)

    def _load_trackers(self) -> None:
        """Offer the trackers installed here as training.report_to's choices, and say which there are."""
        try:
            installed, known = installed_trackers()
        except Exception as err:  # a broken transformers install: report_to keeps what the config names
            self.trackers_note.value = _note(f"The installed trackers could not be read: "
                                             f"{type(err).__name__}: {err}", error=True)
            self.trackers_loaded.set()
            return
        with self._form_lock:
            self.trackers = installed
            self.controls["training.report_to"].offer(installed, unoffered="not installed here")
        self.trackers_note.value = _trackers_note(installed, known)
        self.trackers_loaded.set()

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
        """Block until the generated methods are in the dropdown, the installed trackers offered and the first
        estimate drawn (starting the loading if the builder was never displayed); False if `timeout` seconds
        passed first."""
        self.load_in_background()
        return (self.methods_loaded.wait(timeout) and self.trackers_loaded.wait(timeout)
                and self.memory.wait(timeout))

    # ----- the form <-> config --------------------------------------------------------------------------------
    def _section(self, section: str, only: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Any]:
        boxes = []
        for field in section_fields(section):
            if (only and field.name not in only) or field.name in exclude:
                continue
            dotted = f"{section}.{field.name}"
            labels = OPTION_LABELS.get(dotted) or {  # a choice its help describes: "ddp — each holds the ..."
                choice: f"{choice} — {words}" for choice, words in described_choices(field).items()}
            control = FieldControl(dotted, field, field.default, self._changed, labels,
                                   multi_choice=dotted in MULTI_CHOICE)
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
        self.method_info.value = (f"<div class='nbtune-section-note nbtune-indented'><b>"
                                  f"{html.escape(method.title)}</b> ({html.escape(method.family)}){paper}<br>"
                                  f"{html.escape(method.description)}<br>Recommended learning rate "
                                  f"{method.learning_rate:g} · tasks: {', '.join(method.tasks)}</div>")
        lr = self.controls.get("training.learning_rate")
        if lr is not None:
            lr.input.placeholder = f"auto: {method.learning_rate:g} for {name}"

    def _task_chosen(self) -> None:
        """The user chose a task: a built-in model or dataset of another task gives way to the new task's built-in
        one (the embedded captioner and its captions for image-to-text), said in a note on the Task tab."""
        task = self.controls["model.task"].value
        changes = built_in_changes(task, self.controls["model.name_or_path"].value,
                                   None if self._rows is not None else self.controls["data.source"].value)
        self.switched = {"model.task": task, **changes} if changes else {}
        if changes:
            self.apply(changes)
        else:
            self._show_switched()

    def _show_switched(self) -> None:
        """The note on what the last choice of a task swapped in, while the form still holds it."""
        if not self.switched or any(self.controls[d].value != v for d, v in self.switched.items()):
            self.switch_note.value = ""
            return
        task, *swapped = self.switched.values()
        what = " on ".join(swapped)  # the model on the data, or either alone
        self.switch_note.value = _note(f"{task}: switched to the built-in {what}; set your own on the Model and "
                                       "Data tabs.")

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
            self._rows = source if isinstance(source, (list, dict)) else None
            for section in FORM_SECTIONS:
                values = getattr(config, section)
                for field in section_fields(section):
                    self.controls[f"{section}.{field.name}"].set(getattr(values, field.name))
            source_control = self.controls["data.source"]
            source_control.input.disabled = self._rows is not None
            if self._rows is not None:
                source_control.input.value = describe_source(self._rows)
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

    def _show_stage(self) -> None:
        """The chosen stage in words (note and tooltip), and only the fields it reads of those some stages read:
        hidden, not disabled, so a user of SFT never sees beta."""
        stage = stages.STAGES.get(self.controls["training.stage"].value) or stages.STAGES["sft"]
        words = f"{stage.title}: {stage.description}. Trained by {stage.trainer}."
        environment.set_tooltip(self.controls["training.stage"].input, words)
        self.stage_note.value = (f"<div class='nbtune-section-note nbtune-indented'>{html.escape(stage.description)}"
                                 f"<br>Trained by {html.escape(stage.trainer)} · data formats: "
                                 f"{html.escape(', '.join(stage.formats))}</div>")
        for name in stages.ONLY_SOME_READ:
            control = self.controls.get(f"training.{name}")
            if control is not None:
                control.box.layout.display = None if name in stage.reads else "none"

    def _show_distributed(self) -> None:
        """Only the distributed fields the chosen strategy reads: sharding for fsdp, CPU offload for the strategies
        that can offload. A field set away from its default stays shown, so what another strategy rejects can be
        put back."""
        strategy = self.controls["distributed.strategy"].value
        for names, reads in ((FSDP_ONLY, strategy == "fsdp"), (OFFLOAD_ONLY, strategy in distributed.OFFLOADS)):
            for name in names:
                control = self.controls[f"distributed.{name}"]
                control.box.layout.display = None if reads or control.value != control.field.default else "none"

    def _distributed_words(self, config: TuneConfig | None) -> str:
        """The chosen strategy in words (none for one process: its label says it all), and the effective batch
        its processes make (of a valid form)."""
        strategy = self.controls["distributed.strategy"]
        words = described_choices(strategy.field).get(strategy.value, "")
        text = f"{strategy.value}: {words}." if words and strategy.value != strategy.field.default else ""
        if config is not None and distributed.world_size(config) > 1:
            t, world = config.training, distributed.world_size(config)
            text += (f" {world} processes in all ({config.distributed.processes} per node x "
                     f"{config.distributed.nodes} node{'s' if config.distributed.nodes > 1 else ''}): effective "
                     f"batch {t.micro_batch_size} x {t.gradient_accumulation_steps} x {world} = "
                     f"{t.micro_batch_size * t.gradient_accumulation_steps * world} examples per optimizer step.")
        return _note(text) if text else ""

    def _changed(self) -> None:
        """Validate the whole form, mark every problem at its field and tab, say whether it can run, refresh the
        code and the estimate. Runs on each keystroke: what reads files or the hub waits for the estimate."""
        if self._quiet:
            return
        self._show_stage()
        self._show_distributed()
        config, problems = config_from_values(self.values())
        with self._status_lock:
            self._config, self.problems = config, problems
            unplaced = self._mark_problems(problems)
            if config is None:
                self._show_status(status.problems_html(problems, self.labels(), unplaced), False,
                                  "Fix the marked fields first.")
            else:
                self._show_readiness(preflight.precision_blockers(config, self.memory.gpu.value), final=False)
        self.task_note.value = _task_note(self.methods, config)
        self._show_switched()
        if config is not None:
            self.precision_note.value = ("<div class='nbtune-section-note nbtune-indented'>here: "
                                         f"{html.escape(precision_here(config).reason)}</div>")
            self.code.value = config.to_code()
            self.yaml.value = config.to_yaml()
        self.distributed_note.value = self._distributed_words(config)
        self.memory.update(config)

    def labels(self) -> dict[str, str]:
        """Each dotted field's label as the form shows it: {"training.learning_rate": "learning rate", ...}."""
        return {"method.name": "method", **{dotted: c.label for dotted, c in self.controls.items()}}

    def _mark_problems(self, problems: list[tuple[str, str]]) -> list[str]:
        """Mark each problem at its field (in the form's words) and its tab; returns the fields no control shows."""
        by_field: dict[str, str] = {}
        for name, message in problems:
            by_field.setdefault(name, message)
        labels = self.labels()
        for dotted, control in self.controls.items():
            message = by_field.get(dotted)
            control.show_problem(message, status.in_words(message, labels) if message else None)
        for i, title in enumerate(status.tab_titles(problems)):
            if self.sections.get_title(i) != title:
                self.sections.set_title(i, title)
        shown = {d for d, c in self.controls.items() if c.box.layout.display != "none"}  # the stage hides some
        return [name for name in by_field if name not in shown and name != "method.name"]

    def _estimated(self, config: TuneConfig, estimate: MemoryEstimate | None) -> None:
        """The estimate of `config` landed (on its thread): judge everything that stands in the way of a run,
        and write the static copy the saved notebook keeps."""
        try:
            blockers = preflight.readiness(config, self.memory.gpu.value, estimate)
        except Exception as err:  # it should never raise; if it does, say why rather than "Checking…" for ever
            said = f"{type(err).__name__}: {err}"
            blockers = [preflight.Blocker("", "the checks of whether this config can run failed: "
                                              + (said if len(said) <= 300 else said[:300] + "…"))]
        with self._status_lock:
            if config is not self._config:  # the form changed meanwhile; its own estimate follows
                return
            self._show_readiness(blockers, final=True)
            if self._record is not None:
                self._record.update(self._static_copy(estimate), raw=True)

    def _show_readiness(self, blockers: list[preflight.Blocker], final: bool) -> None:
        """Not ready (with the reasons) when something blocks; else Ready when every check ran, or checking."""
        self.blockers = blockers
        if blockers:
            labels = self.labels()
            self._show_status(status.not_ready_html(blockers, labels), False, status.reasons(blockers, labels))
        elif final and self._config is not None:
            self._show_status(status.ready_html(self._config), True, LAUNCH_HELP)
        else:
            self._show_status(status.checking_html(), None, "Checking whether this config can run…")

    def _show_status(self, value: str, ready: bool | None, launch_help: str) -> None:
        """The status line (classed nbtune-ready / nbtune-not-ready, neither while checking), and Launch enabled
        only when ready, its tooltip saying why not."""
        self.status.value = value
        self.ready = ready is True
        for state, name in ((True, "nbtune-ready"), (False, "nbtune-not-ready")):
            (self.status.add_class if ready is state else self.status.remove_class)(name)
        self.launch_button.disabled = not self.ready
        environment.set_tooltip(self.launch_button, launch_help)

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
        if self._rows is not None and config.data.source == describe_source(self._rows):  # the YAML names them
            config = config.replace(**{"data.source": self._rows})
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
        """Start a run of the form's config and open its dashboard right under the builder; returns the Run.
        The Launch button, enabled only when Ready, is disabled while the run starts; the dashboard says how it
        goes. Called directly, it starts any valid config (training's own preflight judges it)."""
        from nbtune.widgets.dashboard import Dashboard

        import nbtune

        config = self.config
        self.launch_button.disabled = True
        try:
            self.run = nbtune.launch(config, store=self.store)
            if self.dashboard is not None:  # one dashboard under the builder: the newest run's
                self.dashboard.release()
            self.dashboard = Dashboard(self.run, widgets=True)
            if self._slots is not None:
                self.dashboard.show(self._slots)
        finally:
            self.launch_button.disabled = not self.ready
        return self.run


def built_in_changes(task: str, model: Any, source: Any) -> dict[str, str]:
    """What choosing `task` swaps in: its built-in model for a built-in model of another task, and its built-in
    dataset for a built-in dataset of another task ({} where the form holds the user's own, or the task has no
    built-in one)."""
    changes = {}
    wanted = BUILT_IN_MODELS.get(task)
    if wanted and model in BUILT_IN_MODELS.values() and model != wanted:
        changes["model.name_or_path"] = wanted
    datasets = [f"nbtune:{d.name}" for d in embedded.DATASETS.values() if d.task == task]
    name = source.removeprefix("nbtune:") if isinstance(source, str) and source.startswith("nbtune:") else None
    if datasets and name in embedded.DATASETS and embedded.DATASETS[name].task != task:
        changes["data.source"] = datasets[0]
    return changes


def _methods_for(name: str) -> list[registry.Method]:
    """The dropdown's first methods: every one when they are loaded already or the config starts from a
    generated method (its fields are needed now), else the built-in ones (pure data, no peft import)."""
    built_in = registry.all_methods(include_generated=False)
    if registry.generated_loaded() or all(m.name != name for m in built_in):
        return registry.all_methods()
    return built_in


def installed_trackers() -> tuple[list[str], list[str]]:
    """(the experiment trackers transformers reports to that are installed here, every tracker it knows). Imports
    the heavy libraries: the builder calls it on its loading thread."""
    import_heavy()
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(get_available_reporting_integrations()), sorted(INTEGRATION_TO_CALLBACK)


def _trackers_note(installed: list[str], known: list[str]) -> str:
    if installed:
        return _note(f"Installed here: {', '.join(installed)}. Ctrl/⌘-click picks several; none picked: only "
                     "nbtune's store keeps the metrics.")
    return _note(f"No experiment tracker is installed here; transformers reports to {', '.join(known)} "
                 "(pip install one, e.g. tensorboard, then run the builder's cell again).")


def _note(text: str, error: bool = False) -> str:
    """A note under a field, in line with the inputs."""
    style = " style='color:#c62828'" if error else ""
    return f"<div class='nbtune-section-note nbtune-indented'{style}>{html.escape(text)}</div>"


def _method_options(methods: list[registry.Method]) -> list[tuple[str, str]]:
    return [(f"{m.name} — {m.description}", m.name) for m in methods]


def _task_note(methods: list[registry.Method], config: TuneConfig | None) -> str:
    if config is None:
        return ""
    supported = ", ".join(m.name for m in methods if config.model.task in m.tasks)
    return f"<div class='nbtune-section-note'>Methods for this task: {html.escape(supported)}</div>"
