"""The live training dashboard of one run: state, progress, Stop, six live charts and, at the end, a static record.

It is a view over a Run's events. The training thread only appends events; this dashboard receives them on the
run's subscriber thread, folds each into a `RunProgress` in O(1), and redraws at most twice a second (an
injectable clock decides), so a long run costs the same per step as a short one. Charts go out through display
handles updated in place, which also writes them into the notebook; when the run ends the last update is the
full chart (plotly JSON + PNG or HTML) and the summary table, readable without a kernel.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from IPython.display import display
from nbtune.widgets import charts, environment
from nbtune.widgets.progress import RunProgress, Throttle, format_duration, state_words, summary_rows

from nbtune.events import TERMINAL, Event
from nbtune.records import RunSummary

log = logging.getLogger("nbtune")

STATE_COLORS = {"queued": "#757575", "running": "#1565c0", "finished": "#2e7d32", "stopped": "#ef6c00",
                "failed": "#c62828", "interrupted": "#ad1457"}


class Dashboard:
    """Live view of a run; `Dashboard(run)` also reopens any stored run (a Run, a RunRecord or a run id).

    Display it (last line of a cell, or `display(dashboard)`). `interval` is the shortest time between two
    redraws, `max_points` the most points a live trace shows, `clock` the time source of the throttle;
    `widgets=False` shows printed progress instead of controls (the default: controls where widgets render).
    """

    def __init__(self, run: Any, *, interval: float = 0.5, max_points: int = 2000,
                 clock: Callable[[], float] = time.monotonic, trailing: bool = True, store: Any = None,
                 widgets: bool | None = None):
        self.run = _as_run(run, store)
        self.progress = RunProgress(max_points)
        self.throttle = Throttle(interval, clock)
        self.interval = interval
        self.trailing = trailing
        self.renders = 0  # live redraws so far
        self.figure: dict[str, Any] = {"data": [], "layout": {}}
        self._lock = threading.RLock()
        self._handles: list[Any] | None = None
        self._pending: threading.Timer | None = None
        self._recorded = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self.use_widgets = environment.widgets_available() if widgets is None else widgets
        self.chart_out: Any = None  # the live chart (an Output widget) where widgets render
        self.controls = self._make_controls() if self.use_widgets else None

        if self.run.done or self.run.status in ("interrupted",) + TERMINAL:
            for event in list(self.run.events.history):  # a stored run: fold its history right here
                self.progress.apply(event.kind, event.data, event.time)
            self._end_state()
        else:
            self._unsubscribe = self.run.subscribe(self._on_event, replay=True)

    def __repr__(self) -> str:
        return f"<nbtune Dashboard of run {self.run.id}: {self.progress.state}, step {self.progress.step}>"

    # ----- display --------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        self.show()

    def show(self, slots: list[Any] | None = None) -> None:
        """Display the dashboard, in three new outputs or in the given display handles (the builder's)."""
        with self._lock:
            if slots is None:
                environment.prepare_frontend()
                if not self.use_widgets:
                    environment.no_widgets_note()
                slots = [display(_empty(), raw=True, display_id=True) for _ in range(3)]
            self._handles = slots
            if self.progress.ended:
                self._write_record()
            else:
                _update(self._handles[0], self._controls_output())
                if self.chart_out is not None:
                    _update(self._handles[1], self.chart_out)
                self._draw()

    def release(self) -> None:
        """Stop writing into the display handles it was shown in (a newer run's dashboard takes them over)."""
        with self._lock:
            self._handles = None

    def wait(self, timeout: float | None = None) -> Dashboard:
        """Block until the run ended and, if displayed, its static record is written (headless notebooks)."""
        self.run.wait(timeout)
        self._recorded.wait(timeout)
        return self

    # ----- events (on the run's subscriber thread) ------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        with self._lock:
            self.progress.apply(event.kind, event.data, event.time)
            if event.kind in TERMINAL:
                self._end_state()
            elif self.throttle.ready():
                self._draw()
            elif self.trailing and self._pending is None:
                self._pending = threading.Timer(self.interval, self._flush)
                self._pending.daemon = True
                self._pending.start()

    def _flush(self) -> None:
        with self._lock:
            self._pending = None
            if not self.progress.ended:
                self._draw()

    def _draw(self) -> None:
        """One live redraw: the progress controls and the chart, from the folded state (a batch of events)."""
        self.renders += 1
        self.figure = charts.training_figure(self.progress, self._title())
        self._update_controls()
        bundle = charts.live_bundle(self.figure, environment.frontend() == "colab")
        if self.chart_out is not None:
            # A widget's outputs re-render on every change (JupyterLab's plotly renderer ignores in-place
            # display updates of a plot it has drawn), and widget state reaches the page from any thread.
            self.chart_out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
        elif self._handles is not None:
            _update(self._handles[0], self._controls_output())
            self._handles[1].update(bundle, raw=True)

    def _end_state(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        status = self.run.status
        if status in ("interrupted",) + TERMINAL:
            self.progress.state = status
        summary = self.run.summary
        self.progress.error = self.progress.error or (summary.error if summary is not None else None)
        self.figure = charts.training_figure(self.progress, self._title(), final=True)
        self._update_controls()
        if self._handles is not None:
            self._write_record()
        self._recorded.set()

    def _write_record(self) -> None:
        """The static record the notebook keeps: a state line, the full chart and the summary table."""
        assert self._handles is not None
        parts = [
            (0, lambda: {"text/html": self._status_html(static=True), "text/plain": self._status_text()}),
            (1, lambda: charts.final_bundle(self.figure)),  # replaces the live chart widget
            (2, lambda: {"text/html": summary_html(self.run.summary), "text/plain": summary_text(self.run.summary)}),
        ]
        for slot, bundle in parts:
            try:  # one part failing must not cost the others
                self._handles[slot].update(bundle(), raw=True)
            except Exception:
                log.exception("nbtune: could not write part %d of the record of run %s", slot, self.run.id)
        if self.chart_out is not None:
            self.chart_out.outputs = ()  # the saved widget state need not carry a second copy
        if self._unsubscribe is not None:
            threading.Thread(target=self._unsubscribe, daemon=True).start()
        self._recorded.set()

    # ----- the controls ---------------------------------------------------------------------------------------
    def _make_controls(self) -> Any:
        import ipywidgets as w

        self.status_html = w.HTML(self._status_html())
        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="320px"), bar_style="info")
        self.progress_label = w.HTML(self._progress_text())
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger",
                                    layout=w.Layout(width="90px"))
        environment.set_tooltip(self.stop_button, "Stop at the next step; what was learned is kept.")
        self.stop_button.on_click(lambda _: self.stop())
        self.chart_out = w.Output(layout=w.Layout(min_height="470px"))
        return w.VBox([self.status_html, w.HBox([self.bar, self.progress_label, self.stop_button],
                                                layout=w.Layout(align_items="center", gap="12px"))],
                      layout=w.Layout(padding="6px 0"))

    def _controls_output(self) -> Any:
        if self.controls is not None:
            return self.controls
        return {"text/plain": self._status_text(), "text/html": self._status_html(static=True)}

    def _update_controls(self) -> None:
        if self.controls is None:
            return
        p = self.progress
        self.status_html.value = self._status_html()
        self.bar.max = max(p.total_steps or 1, 1)
        self.bar.value = min(p.step, self.bar.max)
        self.bar.bar_style = {"finished": "success", "stopped": "warning", "failed": "danger"}.get(p.state, "info")
        self.progress_label.value = self._progress_text()
        if p.ended:
            self.stop_button.disabled = True

    def stop(self) -> None:
        """Stop the run at its next step (the Stop button)."""
        self.run.stop()
        if self.controls is not None:
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping…"

    # ----- text -----------------------------------------------------------------------------------------------
    def _title(self) -> str:
        return f"{self.run.config.method.name} · {self.run.config.model.name_or_path} · run {self.run.id}"

    def _progress_text(self) -> str:
        p = self.progress
        total = p.total_steps or "?"
        epoch = f"{p.epoch:.2f}" if p.epoch is not None else "–"
        eta = "" if p.ended else f" · ETA {format_duration(p.eta_s)}"
        return (f"<span style='font-family:monospace'>step {p.step}/{total} · epoch {epoch} · elapsed "
                f"{format_duration(p.elapsed_s)}{eta}</span>")

    def _status_text(self) -> str:
        p = self.progress
        eta = "" if p.ended else f", ETA {format_duration(p.eta_s)}"
        return (f"nbtune run {self.run.id} — {state_words(p.state, p.error)} — step {p.step}/{p.total_steps or '?'}"
                f", elapsed {format_duration(p.elapsed_s)}{eta}")

    def _status_html(self, static: bool = False) -> str:
        p = self.progress
        color = STATE_COLORS.get(p.state, "#757575")
        words = html.escape(state_words(p.state, None))
        error = (f"<div style='color:#c62828;margin-top:4px;white-space:pre-wrap'>{html.escape(p.error)}</div>"
                 if p.error else "")
        extra = f" <span style='color:#555'>{self._progress_text()}</span>" if static else ""
        return (f"<div class='nbtune-status'><span style='background:{color};color:white;border-radius:10px;"
                f"padding:1px 9px;font-size:12px'>{html.escape(p.state)}</span> "
                f"<b>{html.escape(self.run.config.method.name)}</b> on "
                f"<code>{html.escape(self.run.config.model.name_or_path)}</code> · run <code>{html.escape(self.run.id)}"
                f"</code> — {words}{extra}{error}</div>")


def summary_html(summary: RunSummary | None) -> str:
    rows = summary_rows(summary)
    if not rows:
        return ""
    body = "".join(f"<tr><th style='text-align:left;padding:2px 12px 2px 0'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='nbtune-summary'><caption style='text-align:left'><b>Run summary</b></caption>{body}</table>"


def summary_text(summary: RunSummary | None) -> str:
    rows = summary_rows(summary)
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _update(handle: Any, obj: Any) -> None:
    """Replace what a display handle shows with a raw mime bundle (dict) or a widget's view; never with the
    widget object itself, which ipywidgets 7 displays as one more output (see `environment.view_bundle`)."""
    handle.update(obj if isinstance(obj, dict) else environment.view_bundle(obj), raw=True)


def _empty() -> dict[str, str]:
    return {"text/plain": ""}


def _as_run(run: Any, store: Any = None) -> Any:
    """A Run from a Run, a RunRecord or a run id in the store."""
    if hasattr(run, "subscribe"):
        return run
    from nbtune.runner import open_run
    from nbtune.store import RunStore

    if isinstance(run, str):
        store = store if isinstance(store, RunStore) else RunStore(store)
        run = store.get(run)
    return open_run(run)
