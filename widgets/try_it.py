"""The "Try it" widget: one prompt answered by the untuned base and by the runs you pick, each answer streamed
into its own column as it is generated (`nbtune.generation.stream`), the columns side by side.

The answers come one after another on one background thread (one model generates at a time; the kernel stays
free), and each column redraws at most ten times a second. Settings are checked before anything loads.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from nbtune.widgets.progress import Throttle

from nbtune.comparison import Comparison, unique_names
from nbtune.config import TuneConfig
from nbtune.generation import GenerationSettings, stream, streaming_settings

if TYPE_CHECKING:
    from nbtune.runner import Run

BASE = "base"  # the untuned base's column
PLAIN = "nbtune Try it (the live widget needs a running kernel; the latest answers follow as a static copy)"
STATIC_CLASS = "nbtune-static-try-it"  # hidden by the live page's CSS (widgets/forms.py)
ANSWER_STYLE = "white-space:pre-wrap;font-family:monospace;font-size:12px;margin:0"
ERROR_STYLE = "color:#c62828;font-size:12px"


class TryIt:
    """A prompt box, generation settings, the runs to ask and Generate; the answers of the base (first) and of
    each selected run stream side by side. Display it as the last line of a cell. `thread` is the latest
    generation's (None before the first); `answers` holds each column's text so far."""

    def __init__(self, runs: Mapping[str, Run | None] | Iterable[Run], base: TuneConfig | None = None):
        self.runs = _named(runs)
        if not self.runs and base is None:
            raise ValueError("TryIt needs a run or a base config to answer with (got neither)")
        first = next(iter(self.runs.values()), None)
        self.base = base if base is not None else first.config
        self._first = first  # the base answers as the runs were trained: chat-templated or not
        defaults = GenerationSettings()
        self.prompt = w.Textarea(placeholder="Ask something", layout=w.Layout(width="100%", height="70px"))
        self.max_new_tokens = w.IntText(defaults.max_new_tokens, description="max new tokens")
        self.sampling = w.Checkbox(defaults.do_sample, description="sampling", indent=False)
        self.temperature = w.FloatText(defaults.temperature, description="temperature", disabled=True)
        self.chat = w.Checkbox(False, description="chat mode (always the chat template)", indent=False)
        self.chosen = w.SelectMultiple(options=list(self.runs), value=tuple(self.runs), description="runs",
                                       rows=min(max(len(self.runs), 2), 8))
        self.button = w.Button(description="Generate", button_style="primary")
        self.message = w.HTML()
        self.columns = w.HBox(layout=w.Layout(flex_flow="row wrap", gap="12px"))
        self.answers: dict[str, str] = {}
        self._asked = ""  # the prompt the answers are for
        self._record: Any = None  # the display handle of the static copy
        self.thread: threading.Thread | None = None
        self._views: dict[str, w.HTML] = {}
        self.sampling.observe(lambda change: setattr(self.temperature, "disabled", not change["new"]), "value")
        self.button.on_click(lambda _: self.generate())
        settings = w.HBox([self.max_new_tokens, self.sampling, self.temperature, self.chat],
                          layout=w.Layout(flex_flow="row wrap", gap="8px"))
        self.box = w.VBox([self.prompt, settings, w.HBox([self.chosen, self.button]), self.message, self.columns])

    def _ipython_display_(self) -> None:
        from IPython.display import display
        from nbtune.widgets import environment

        environment.prepare_frontend()
        # Raw, so that where no widget renders (nbconvert, GitHub) the text says what it is, not `VBox(children=...`;
        # then a static copy of the latest answers that a saved notebook keeps (the live page's CSS hides it).
        display({**environment.view_bundle(self.box), "text/plain": PLAIN}, raw=True)
        self._record = display(self._static_copy(), raw=True, display_id=True)

    def _static_copy(self) -> dict[str, str]:
        """The latest prompt and answers as HTML and text, for a saved notebook."""
        if not self.answers:
            text = "nbtune Try it: no answers yet"
            return {"text/html": f"<div class='{STATIC_CLASS}'>{text}</div>", "text/plain": text}
        cells = "".join(f"<td style='vertical-align:top;padding:4px 8px'><b>{html.escape(name)}</b>"
                        f"{_answer_html(answer)}</td>" for name, answer in self.answers.items())
        prompt = html.escape(self._asked)
        page = (f"<div class='{STATIC_CLASS}'><div><b>nbtune</b> · Try it: <code>{prompt}</code></div>"
                f"<table><tr>{cells}</tr></table></div>")
        text = "\n".join([f"Try it: {self._asked}", *(f"{n}: {a}" for n, a in self.answers.items())])
        return {"text/html": page, "text/plain": text}

    def settings(self) -> dict[str, Any]:
        """The generation settings the controls say (sampling's only when sampling; chat mode forces the
        template, otherwise each run answers as it was trained)."""
        chosen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens.value, "do_sample": self.sampling.value}
        if self.sampling.value:
            chosen["temperature"] = self.temperature.value
        if self.chat.value:
            chosen["chat_template"] = True
        return chosen

    def generate(self) -> threading.Thread | None:
        """Check the prompt and settings (a problem is shown, naming the field, and nothing starts), then stream
        the answers of the base and the selected runs into fresh columns on a background thread."""
        if self.thread is not None and self.thread.is_alive():
            return None
        try:
            chosen = streaming_settings(self.prompt.value, **self.settings())
        except ValueError as err:
            self.message.value = f"<span style='{ERROR_STYLE}'>{html.escape(str(err))}</span>"
            return None
        self.message.value = ""
        answerers: dict[str, Run | TuneConfig] = {BASE: self.base, **{n: self.runs[n] for n in self.chosen.value}}
        self._columns(list(answerers))
        self.button.disabled = True
        self.thread = threading.Thread(target=self._answer_all, args=(answerers, self.prompt.value, chosen),
                                       name="nbtune-try-it", daemon=True)
        self.thread.start()
        return self.thread

    def _columns(self, names: list[str]) -> None:
        """One empty column per answerer, made here on the kernel's thread (the stream's thread only sets values)."""
        self.answers = dict.fromkeys(names, "")
        self._views = {name: w.HTML(_answer_html("")) for name in names}
        self.columns.children = [w.VBox([w.HTML(f"<b>{html.escape(name)}</b>"), self._views[name]],
                                        layout=w.Layout(flex="1 1 220px", min_width="180px", padding="4px 8px",
                                                        border="1px solid #e0e0e0")) for name in names]

    def _answer_all(self, answerers: Mapping[str, Run | TuneConfig], prompt: str,
                    settings: GenerationSettings) -> None:
        """The background thread: each answerer in turn streams into its column; an error ends only its column."""
        self._asked = prompt
        try:
            for name, answerer in answerers.items():
                self._answer(name, answerer, prompt, settings)
        finally:
            self.button.disabled = False
            if self._record is not None:
                self._record.update(self._static_copy(), raw=True)

    def _answer(self, name: str, answerer: Run | TuneConfig, prompt: str, settings: GenerationSettings) -> None:
        if isinstance(answerer, TuneConfig) and settings.chat_template is None and self._first is not None:
            settings = settings.for_run(self._first)
        throttle = Throttle(0.1)
        try:
            for piece in stream(answerer, prompt, **settings.to_dict()):
                self.answers[name] += piece
                if throttle.ready():
                    self._views[name].value = _answer_html(self.answers[name])
        except Exception as err:  # shown in the column: one answerer's failure is not the others'
            failure = html.escape(f"{type(err).__name__}: {err}")
            self._views[name].value = _answer_html(self.answers[name]) + f"<div style='{ERROR_STYLE}'>{failure}</div>"
            return
        self._views[name].value = _answer_html(self.answers[name])


def _answer_html(text: str) -> str:
    return f"<pre style='{ANSWER_STYLE}'>{html.escape(text) or '…'}</pre>"


def _named(runs: Mapping[str, Run | None] | Iterable[Run]) -> dict[str, Run]:
    """The runs by name (a sequence: by method, as a comparison names them); untrained ones (None) left out."""
    if isinstance(runs, Comparison):
        runs = runs.runs
    if not isinstance(runs, Mapping):
        handles = list(runs)
        runs = dict(zip(unique_names([run.config.method.name for run in handles]), handles, strict=True))
    taken = [name for name in runs if name == BASE]
    if taken:
        raise ValueError(f"a run may not be called {BASE!r} in TryIt (the base's column)")
    return {name: run for name, run in runs.items() if run is not None}


def try_it(runs: Mapping[str, Run | None] | Iterable[Run] | Comparison, base: TuneConfig | None = None) -> TryIt:
    """`nbtune.try_it(runs)`: the Try it widget over runs (a mapping, a list, or a Comparison, whose base config
    is then the base)."""
    if isinstance(runs, Comparison) and base is None:
        base = runs.base_config
    return TryIt(runs, base)
