"""The memory panel: the estimator's breakdown of a config as a stacked bar, against a chosen GPU, with its fit
verdict, one-click suggestions, "Fit to GPU" and the exact (simulated) tier on demand.

A view over `nbtune.estimator`: it never computes memory itself. Estimates run off the main thread after the
form has been still for `debounce_s` seconds, so typing stays responsive; until one lands the panel says it is
estimating. Every control is created here, on the main thread: the estimate's thread only sets values.
"""

from __future__ import annotations

import html
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as w
from nbtune.widgets.environment import set_tooltip

from nbtune.config import TuneConfig
from nbtune.estimator.gpus import GPUS, gpu_bytes
from nbtune.units import format_bytes, format_percent

if TYPE_CHECKING:
    from nbtune.estimator.estimate import MemoryEstimate, Suggestion

log = logging.getLogger("nbtune")

PALETTE = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f", "#9e9d24", "#5d4037", "#ad1457",
           "#455a64"]
DEFAULT_GPU = "t4"
MAX_SUGGESTIONS = 5
TITLE = "<b>Memory</b> <span class='nbtune-help'>{}</span>"
# The first estimate of a session reads the model's configuration through transformers (2-4 s on 2 cores).
FIRST_ESTIMATE = "<span class='nbtune-help'>Estimating… (the first estimate loads the model's shape)</span>"
INVALID = "<span class='nbtune-help'>Fix the marked fields to see the estimate.</span>"
COST_STYLE = "color:#757575;font-size:11px"  # inline too: the static copy renders without the builder's STYLE
SUGGESTIONS_LEGEND = ("<div style='color:#616161;font-size:12px'>Suggestions · ✔ fits the GPU with the change · "
                      f"✘ still too big · <span style='{COST_STYLE}'>cost in grey</span></div>")


class MemoryPanel:
    """Shows `estimate_memory(config, gpu=...)` for the latest config it was given.

    `on_apply(changes)` is called with a suggestion's dotted-field changes when its button is clicked;
    `on_estimate(config, estimate)` on the estimate's thread when an estimate of `config` lands (None when it
    failed; `error` says why), before `wait` returns.
    """

    def __init__(self, config: TuneConfig | None = None, gpu: str = DEFAULT_GPU, debounce_s: float = 0.3,
                 on_apply: Callable[[dict[str, Any]], None] | None = None,
                 on_estimate: Callable[[TuneConfig, MemoryEstimate | None], None] | None = None):
        self.config = config
        self.debounce_s = debounce_s
        self.on_apply = on_apply
        self.on_estimate = on_estimate
        self.estimate: MemoryEstimate | None = None
        self.fit: Suggestion | None = None  # what "Fit to GPU" applies; None when nothing known makes it fit
        self.error: str | None = None
        self.simulation: Any = None
        self.segments: list[tuple[str, int]] = []  # the stacked bar: (category, bytes), as drawn
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self._settled = threading.Event()  # no estimate pending: the panel shows the latest config's
        self._settled.set()

        options = [(str(spec["title"]), name) for name, spec in GPUS.items()]
        self.gpu = w.Dropdown(options=options, value=gpu if gpu in [o[1] for o in options] else options[0][1],
                              description="GPU", style={"description_width": "40px"},
                              layout=w.Layout(width="100%", max_width="320px"))
        set_tooltip(self.gpu, "The GPU to check the plan against.")
        self.gpu.observe(lambda _: self.update(self.config), names="value")
        self.title = w.HTML(TITLE.format("instant estimate"))
        self.bar = w.HTML("")
        self.legend = w.HTML("")
        self.verdict = w.HTML(FIRST_ESTIMATE)
        self.fit_button = w.Button(description="Fit to GPU", icon="compress", layout=w.Layout(width="130px",
                                                                                            display="none"))
        self.fit_button.on_click(lambda _: self.fit is not None and self.apply(self.fit))
        self.suggestions = w.VBox([])
        self._suggestions_header = w.HTML(SUGGESTIONS_LEGEND)
        self.suggestion_rows = [SuggestionRow(lambda i=i: self.apply(self._shown[i])) for i in range(MAX_SUGGESTIONS)]
        self._shown: list[Suggestion] = []  # the suggestions the rows stand for, in order
        self.simulate_button = w.Button(description="Simulate (exact)", icon="microchip",
                                        layout=w.Layout(width="170px"))
        set_tooltip(self.simulate_button, "Run the exact tier: build the model on a fake device and trace a "
                                          "training step. Slower than the instant estimate.")
        self.simulate_button.on_click(lambda _: self.simulate())
        self.simulate_progress = w.IntProgress(value=0, min=0, max=100, layout=w.Layout(width="150px",
                                                                                      display="none"))
        self.simulate_result = w.HTML("")
        self.box = w.VBox([
            w.HBox([self.title], layout=w.Layout(justify_content="space-between")), self.gpu, self.bar,
            self.legend, self.verdict, self.fit_button, self.suggestions,
            w.HBox([self.simulate_button, self.simulate_progress], layout=w.Layout(align_items="center")),
            self.simulate_result,
        ], layout=w.Layout(flex="1 1 340px", min_width="300px", max_width="520px", padding="8px 12px",
                           border="1px solid #e0e0e0"))
        if config is not None:
            self.update(config)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)

    # ----- estimating -----------------------------------------------------------------------------------------
    def update(self, config: TuneConfig | None, at_once: bool = False) -> None:
        """Re-estimate for `config` after the debounce (`at_once`, or a debounce_s of 0: now, on this thread);
        None clears the panel."""
        self.config = config
        with self._lock:
            self._generation += 1
            generation = self._generation
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if config is None:  # nothing of an older config's estimate stays beside "fix the marked fields"
                self.estimate, self.error, self.fit = None, None, None
                self._clear(INVALID)
                self.title.value = TITLE.format("instant estimate")
                self._settled.set()
                return
            self._settled.clear()
            self.title.value = TITLE.format("estimating…")
            if self.debounce_s > 0 and not at_once:
                self._timer = threading.Timer(self.debounce_s, self._estimate, (config, generation))
                self._timer.daemon = True
                self._timer.start()
                return
        self._estimate(config, generation)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest config's estimate is drawn; False if `timeout` seconds passed first."""
        return self._settled.wait(timeout)

    def _estimate(self, config: TuneConfig, generation: int) -> None:
        from nbtune.estimator import estimate_memory

        gpu = self.gpu.value
        try:
            result, error = estimate_memory(config, gpu=gpu), None
        except Exception as err:  # an unreachable hub model, an unsupported architecture: say why
            result, error = None, f"{type(err).__name__}: {err}"
        try:
            fit = fit_for(result, config, gpu) if result is not None else None
        except Exception:  # the estimate stands without a Fit to GPU
            log.exception("nbtune: fit_to_gpu failed")
            fit = None
        with self._lock:
            if generation != self._generation:  # the form changed meanwhile; a newer estimate follows
                return
            self.estimate, self.error, self.fit = result, error, fit
            self._render()
            self.title.value = TITLE.format("instant estimate")
        if self.on_estimate is not None:
            try:
                self.on_estimate(config, result)
            except Exception:  # the panel stays usable whatever its listener does
                log.exception("nbtune: the memory panel's on_estimate failed")
        with self._lock:
            if generation == self._generation:
                self._settled.set()

    def _clear(self, verdict: str) -> None:
        """No bar, breakdown, Fit to GPU or suggestions; only `verdict`."""
        self.segments = []
        self.bar.value = ""
        self.legend.value = ""
        self.verdict.value = verdict
        self.fit_button.layout.display = "none"
        self._shown = []
        self.suggestions.children = ()

    def _render(self) -> None:
        if self.estimate is None:
            self._clear(f"<span style='color:#c62828'>No estimate: {html.escape(self.error or '')}</span>")
            return
        est = self.estimate
        self.segments = [(k, int(v)) for k, v in est.breakdown.items() if v]
        capacity = gpu_bytes(self.gpu.value)[1]
        self.bar.value = stacked_bar_html(self.segments, capacity, self.gpu.label or self.gpu.value)
        self.legend.value = legend_html(self.segments, int(est.total_bytes)) + cpu_html(est)
        fits = est.fits(self.gpu.value)
        color = "#2e7d32" if fits else "#c62828"
        mark = "✔" if fits else "✘"
        self.verdict.value = (f"<div style='color:{color};font-weight:600;margin:4px 0'>{mark} "
                              f"{html.escape(est.verdict)}</div>")
        self._show_fit(fits)
        self._shown = list(est.suggestions)[:MAX_SUGGESTIONS]
        for suggestion, row in zip(self._shown, self.suggestion_rows, strict=False):
            row.show(suggestion)
        rows = [row.box for row in self.suggestion_rows[:len(self._shown)]]
        self.suggestions.children = (self._suggestions_header, *rows) if rows else ()

    def _show_fit(self, fits: bool) -> None:
        """Fit to GPU: hidden when the step fits; disabled, saying why, when no known change makes it fit."""
        self.fit_button.layout.display = "none" if fits else ""
        self.fit_button.disabled = self.fit is None
        gpu = self.gpu.label or self.gpu.value
        if self.fit is None:
            set_tooltip(self.fit_button, f"No change nbtune knows of makes this step fit the {gpu}; a GPU with "
                                         "more memory, a smaller model or a shorter sequence may.")
        else:
            set_tooltip(self.fit_button, f"{self.fit.description} → {format_bytes(self.fit.total_bytes)}; "
                                         f"applies {_changes_words(self.fit.changes)}")

    def apply(self, suggestion: Suggestion) -> None:
        """Apply a suggestion's changes to the form (through `on_apply`)."""
        if self.on_apply is not None:
            self.on_apply(dict(suggestion.changes))

    # ----- the exact tier -------------------------------------------------------------------------------------
    def simulate(self, wait: bool = False) -> None:
        """Run the estimator's exact tier for the current config on a thread, with progress."""
        if self.config is None:
            return
        config, gpu = self.config, self.gpu.value
        self.simulate_button.disabled = True
        self.simulate_progress.layout.display = ""
        self.simulate_progress.value = 0
        self.simulate_result.value = "<span class='nbtune-help'>Simulating…</span>"

        done = threading.Event()
        thread = threading.Thread(target=self._simulated, args=(config, gpu, done), name="nbtune-simulate",
                                  daemon=True)
        threading.Thread(target=self._tick, args=(done,), daemon=True).start()
        thread.start()
        if wait:
            thread.join()

    def _tick(self, done: threading.Event) -> None:
        """The exact tier reports no progress of its own: show time passing, never 100%."""
        started = time.monotonic()
        while not done.wait(0.25):
            fraction = 0.95 * (1 - math.exp(-(time.monotonic() - started) / 8))
            self.simulate_progress.value = int(fraction * 100)

    def _simulated(self, config: TuneConfig, gpu: str, done: threading.Event) -> None:
        from nbtune.estimator import simulate_memory

        try:
            self.simulation = simulate_memory(config, gpu=gpu)
            instant = self.estimate.total_bytes if self.estimate is not None else None
            self.simulate_result.value = (f"<b>Exact tier:</b> {format_bytes(self.simulation.total_bytes)} "
                                          f"<span class='nbtune-help'>(instant: {format_bytes(instant)})</span>")
        except Exception as err:
            self.simulate_result.value = f"<span style='color:#c62828'>Simulation failed: {html.escape(str(err))}</span>"
        finally:
            done.set()
            self.simulate_progress.value = 100
            self.simulate_progress.layout.display = "none"
            self.simulate_button.disabled = False


class SuggestionRow:
    """One suggestion: a small Apply button, its description (wrapping) with its cost in grey, and the peak it
    leads to with a fits mark, always shown in full."""

    def __init__(self, on_click: Callable[[], None]):
        self.apply_button = w.Button(description="Apply", layout=w.Layout(width="62px", flex="0 0 auto"))
        self.apply_button.on_click(lambda _: on_click())
        self.text = w.HTML("", layout=w.Layout(flex="1 1 auto", min_width="0"))
        self.size = w.HTML("", layout=w.Layout(flex="0 0 auto"))
        self.box = w.HBox([self.apply_button, self.text, self.size], layout=w.Layout(align_items="center",
                                                                                     width="100%"))
        self.box.add_class("nbtune-suggestion")

    def show(self, suggestion: Suggestion) -> None:
        self.text.value = suggestion_text_html(suggestion)
        self.size.value = suggestion_size_html(suggestion)
        set_tooltip(self.apply_button, f"Applies {_changes_words(suggestion.changes)}")


def suggestion_text_html(s: Suggestion) -> str:
    """A suggestion's description, wrapping, with its cost (plain words) in small grey text."""
    cost = s.cost
    return (f"<div style='font-size:12px;line-height:1.3;white-space:normal'>{html.escape(s.description)}"
            + (f" <span class='nbtune-cost' style='{COST_STYLE}'>{html.escape(cost)}</span>"
               if cost else "") + "</div>")


def suggestion_size_html(s: Suggestion) -> str:
    """The peak a suggestion leads to, with ✔ (fits the GPU) or ✘ (still too big); never cut."""
    mark = "" if s.fits is None else (" <span style='color:#2e7d32'>✔</span>" if s.fits else
                                      " <span style='color:#c62828'>✘</span>")
    return f"<span style='white-space:nowrap;font-size:12px'>→ <b>{format_bytes(s.total_bytes)}</b>{mark}</span>"


def fit_for(estimate: MemoryEstimate, config: TuneConfig, gpu: str) -> Suggestion | None:
    """What "Fit to GPU" applies: the cheapest change that fits with a margin; None when the step fits already
    or nothing known makes it fit."""
    if estimate.fits(gpu):
        return None
    from nbtune.estimator import fit_to_gpu

    return fit_to_gpu(config, gpu)


def _changes_words(changes: dict[str, Any]) -> str:
    return ", ".join(f"{name} = {value}" for name, value in changes.items())


def _label(category: str) -> str:
    from nbtune.estimator.estimate import LABELS

    return LABELS.get(category, category.replace("_", " "))


def stacked_bar_html(segments: list[tuple[str, int]], capacity: int, gpu_title: str) -> str:
    """A horizontal stacked bar of the breakdown, scaled to max(total, GPU), with the GPU's size marked."""
    total = sum(b for _, b in segments)
    scale = max(total, capacity, 1)
    parts = "".join(
        f"<div title='{html.escape(_label(name))}: {format_bytes(b)}' style='width:{100 * b / scale:.3f}%;"
        f"background:{PALETTE[i % len(PALETTE)]};height:100%'></div>" for i, (name, b) in enumerate(segments))
    marker = (f"<div title='{html.escape(gpu_title)}' style='position:absolute;left:{100 * capacity / scale:.3f}%;"
              "top:-4px;bottom:-4px;border-left:2px dashed #212121'></div>")
    over = total > capacity
    return (f"<div class='nbtune-memory-bar' style='margin:8px 0 2px 0'>"
            f"<div style='position:relative;display:flex;height:22px;background:#f1f3f4;border-radius:3px'>"
            f"{parts}{marker}</div>"
            f"<div style='display:flex;justify-content:space-between;font-size:12px;color:#424242;margin-top:3px'>"
            f"<span><b>{format_bytes(total)}</b> estimated</span>"
            f"<span style='color:{'#c62828' if over else '#424242'}'>GPU {format_bytes(capacity)}</span></div></div>")


def legend_html(segments: list[tuple[str, int]], total: int) -> str:
    rows = "".join(
        f"<tr><td><span style='display:inline-block;width:10px;height:10px;background:{PALETTE[i % len(PALETTE)]};"
        f"margin-right:6px'></span>{html.escape(_label(name))}</td>"
        f"<td style='text-align:right;padding-left:12px;white-space:nowrap'>{format_bytes(b)}</td>"
        f"<td style='text-align:right;padding-left:8px;color:#757575;white-space:nowrap'>"
        f"{format_percent(b, total)}</td></tr>"
        for i, (name, b) in enumerate(segments))
    return (f"<table style='font-size:12px;border-collapse:collapse;width:100%;line-height:1.5'>{rows}"
            f"<tr style='border-top:1px solid #e0e0e0'><td><b>total at the peak</b></td><td style='text-align:right;"
            f"white-space:nowrap'><b>{format_bytes(total)}</b></td><td></td></tr></table>")


def cpu_html(est: MemoryEstimate) -> str:
    """The CPU memory a distributed run's offloaded shards take (distributed.cpu_offload); "" without any."""
    if not est.cpu_bytes:
        return ""
    return (f"<div style='font-size:12px;color:#424242;margin-top:2px'>+ <b>{format_bytes(est.cpu_bytes)}</b> "
            f"of CPU memory {html.escape(est.cpu_words())}</div>")


def estimate_html(est: MemoryEstimate, gpu: str, title: str = "") -> str:
    """A memory estimate as static HTML (what `%nbtune estimate` shows): bar, breakdown, verdict, suggestions."""
    segments = [(k, int(v)) for k, v in est.breakdown.items() if v]
    gpu_title, capacity = gpu_bytes(gpu)
    fits = est.fits(gpu)
    suggestions = "".join(
        f"<li>{suggestion_text_html(s)}{suggestion_size_html(s)} "
        f"<code style='font-size:11px;color:#757575'>{html.escape(_changes_words(s.changes))}</code></li>"
        for s in list(est.suggestions)[:MAX_SUGGESTIONS])
    return (f"<div style='max-width:560px'><b>Memory</b> · {html.escape(title)}"
            f"{stacked_bar_html(segments, capacity, gpu_title)}{legend_html(segments, int(est.total_bytes))}"
            f"{cpu_html(est)}"
            f"<div style='color:{'#2e7d32' if fits else '#c62828'};font-weight:600;margin:6px 0'>"
            f"{'✔' if fits else '✘'} {html.escape(est.verdict)} ({html.escape(gpu_title)})</div>"
            + (f"<div>{SUGGESTIONS_LEGEND}<ul>{suggestions}</ul></div>" if suggestions else "") + "</div>")
