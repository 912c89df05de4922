"""The live training dashboard of one run: state, progress, Stop, Resume, six live charts (and a row of the
stage's own, such as DPO's rewards) and, at the end, a static record.

It is a view over a Run's events. The training thread only appends events; this dashboard receives them on the
run's subscriber thread, folds each into a `RunProgress` in O(1), and redraws at most twice a second (an
injectable clock decides), so a long run costs the same per step as a short one. Where widgets render, the
chart is one plotly FigureWidget changed in place (only the traces and layout entries that changed are sent);
on Colab, which has no anywidget support offline, an Output widget shows plotly JSON and HTML; without widgets,
display handles are updated in place. When the run ends the last update is the static record (plotly JSON +
PNG, the summary table, the library messages), readable without a kernel, and the live widget is closed.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from IPython.display import display
from nbtune.widgets import charts, environment
from nbtune.widgets.progress import ENDED, RunProgress, Throttle, format_duration, state_words, summary_rows

from nbtune import stages
from nbtune.events import TERMINAL, Event
from nbtune.records import RunSummary

log = logging.getLogger("nbtune")

STATE_COLORS = {"queued": "#757575", "starting": "#5c6bc0", "running": "#1565c0", "finished": "#2e7d32",
                "stopped": "#ef6c00", "failed": "#c62828", "interrupted": "#ad1457"}


class LiveChart:
    """The live training chart as one plotly FigureWidget (create it on the main thread), changed in place:
    each update restyles only the traces that changed and relayouts only the layout entries that changed, so
    plotly.js never re-creates its six subplots (a new plotly bundle per redraw made pages sluggish)."""

    def __init__(self, figure: dict[str, Any]):
        import plotly.graph_objects as go

        self.widget = go.FigureWidget(figure)
        self.shown = figure  # the figure dict the widget shows (each redraw builds a new one)

    def view(self) -> dict[str, Any]:
        """The widget's view as a raw mime bundle (its state synced with what it shows now)."""
        return {**self.widget._repr_mimebundle_(), "text/plain": charts._plain(self.shown)}

    def update(self, figure: dict[str, Any]) -> charts.FigureChanges:
        """Send what changed from the shown figure to `figure`; traces get added with their first points."""
        changes = charts.figure_changes(self.shown, figure)
        widget = self.widget
        if changes.removed:
            widget.data = [trace for trace in widget.data if trace.name not in changes.removed]
        if changes.restyled or changes.relayout:
            with widget.batch_update():  # one message for all of it
                traces = {trace.name: trace for trace in widget.data}
                for name, properties in changes.restyled.items():
                    traces[name].update(properties)
                if changes.relayout:
                    widget.update_layout(changes.relayout)
        if changes.added:
            widget.add_traces(changes.added)
        self.shown = figure
        return changes

    def close(self) -> None:
        self.widget.close()


def _figure_widget_renders() -> bool:
    """plotly's FigureWidget needs anywidget, whose front-end Colab cannot load offline."""
    return environment.frontend() != "colab" and importlib.util.find_spec("anywidget") is not None


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
        self.stage = stages.for_config(self.run.config)
        self.progress = RunProgress(max_points, self.stage)
        self.throttle = Throttle(interval, clock)
        self.interval = interval
        self.trailing = trailing
        self.renders = 0  # live redraws so far
        self.figure: dict[str, Any] = {"data": [], "layout": {}}
        self.log_loss = False  # the loss panel on a log scale (the "log loss" toggle)
        self._lock = threading.RLock()
        self._handles: list[Any] | None = None
        self._pending: threading.Timer | None = None
        self._recorded = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._messages_shown = 0
        self.use_widgets = environment.widgets_available() if widgets is None else widgets
        self.chart: LiveChart | None = None  # the live chart where widgets render
        self.chart_out: Any = None  # the live chart on Colab: an Output widget
        self.controls = self._make_controls() if self.use_widgets else None

        if self.run.done or self.run.status in ENDED:
            for event in list(self.run.events.history):  # a stored run: fold its history right here
                self.progress.apply(event.kind, event.data, event.time)
            self._end_state()
        else:
            self._follow(self.run)

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
                self._show_live()

    def _show_live(self) -> None:
        assert self._handles is not None
        _update(self._handles[0], self._controls_output())
        if self.chart is not None:
            self._handles[1].update(self.chart.view(), raw=True)
        elif self.chart_out is not None:
            _update(self._handles[1], self.chart_out)
        self._draw()

    def release(self) -> None:
        """Stop writing into the display handles it was shown in (a newer run's dashboard takes them over)."""
        with self._lock:
            self._handles = None
            self._close_chart()
            self.chart_out = None

    def wait(self, timeout: float | None = None) -> Dashboard:
        """Block until the run ended and, if displayed, its static record is written (headless notebooks)."""
        self.run.wait(timeout)
        self._recorded.wait(timeout)
        return self

    # ----- following a run (its events arrive on the run's subscriber thread) --------------------------------
    def _follow(self, run: Any) -> None:
        """Show `run` live from here: a live chart, Stop enabled, then its events (the past ones first)."""
        self.run = run
        self._recorded.clear()
        if self.controls is not None:
            self._open_chart()
            self.stop_button.disabled = False
            self.stop_button.description = "Stop"

        def on_event(event: Event) -> None:
            self._on_event(event, run)

        self._unsubscribe = run.subscribe(on_event, replay=True)

    def _on_event(self, event: Event, run: Any = None) -> None:
        with self._lock:
            if run is not None and run is not self.run:
                return  # the run this dashboard followed before a Resume
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
        self.figure = charts.training_figure(self.progress, self._title(), log_loss=self.log_loss)
        self._update_controls()
        if self.chart is not None:
            self.chart.update(self.figure)
        elif self.chart_out is not None:
            # A widget's outputs re-render on every change (JupyterLab's plotly renderer ignores in-place
            # display updates of a plot it has drawn), and widget state reaches the page from any thread.
            bundle = charts.live_bundle(self.figure, environment.frontend() == "colab")
            self.chart_out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
        elif self._handles is not None and self.controls is None:  # printed progress, a chart updated in place
            _update(self._handles[0], self._controls_output())
            self._handles[1].update(charts.live_bundle(self.figure, environment.frontend() == "colab"), raw=True)

    def _end_state(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        status = self.run.status
        if status in ENDED:
            self.progress.state = status
        summary = self.run.summary
        self.progress.error = self.progress.error or (summary.error if summary is not None else None)
        self.figure = charts.training_figure(self.progress, self._title(), final=True, log_loss=self.log_loss)
        self._update_controls()
        if self._handles is not None:
            self._write_record()
        self._close_chart()
        self._recorded.set()

    def _write_record(self) -> None:
        """The static record the notebook keeps: a state line (with Resume where the run can go on), the full
        chart and the summary table with the library messages."""
        assert self._handles is not None
        parts = [
            (0, self._status_record),
            (1, lambda: charts.final_bundle(self.figure)),  # replaces the live chart widget
            (2, lambda: {"text/html": summary_html(self.run.summary, self.stage) + samples_html(self.progress)
                         + details_html(self.progress),
                         "text/plain": summary_text(self.run.summary, self.stage)}),
        ]
        for slot, bundle in parts:
            try:  # one part failing must not cost the others
                self._handles[slot].update(bundle(), raw=True)
            except Exception:
                log.exception("nbtune: could not write part %d of the record of run %s", slot, self.run.id)
        self._close_chart()  # the saved widget state need not carry a second copy (~5 MB of plotly.js)
        if self._unsubscribe is not None:
            threading.Thread(target=self._unsubscribe, daemon=True).start()
        self._recorded.set()

    def _status_record(self) -> dict[str, Any]:
        bundle = {"text/html": self._status_html(static=True), "text/plain": self._status_text()}
        if self.controls is not None and self._resumable():  # the controls stay, with their Resume button
            return {**environment.view_bundle(self.controls), **bundle}
        return bundle

    # ----- the chart ------------------------------------------------------------------------------------------
    def _open_chart(self) -> None:
        """The live chart for the run followed now, made on the main thread (with the dashboard, a Resume, or
        when a page first shows the controls). A FigureWidget is made only once a page shows the dashboard:
        a headless run (nbclient) never shows one, and nbclient saves even a closed widget's state, ~5 MB of
        plotly.js per chart."""
        import ipywidgets as w

        if not _figure_widget_renders():
            if self.chart_out is None:
                self.chart_out = w.Output(layout=w.Layout(min_height="470px"))
        elif self.chart is None and (self.controls._view_count or 0) > 0:
            self.chart = LiveChart(charts.training_figure(self.progress, self._title(), log_loss=self.log_loss))

    def _on_shown(self, change: dict[str, Any]) -> None:
        """The page counts the views of the controls: the first one brings the live chart."""
        with self._lock:
            if self.chart is not None or self.progress.ended or not change["new"]:
                return
            self._open_chart()
            if self.chart is not None and self._handles is not None:
                self._handles[1].update(self.chart.view(), raw=True)

    def _close_chart(self) -> None:
        if self.chart is not None:
            self.chart.close()
            self.chart = None
        if self.chart_out is not None:
            self.chart_out.outputs = ()

    def _on_log_loss(self, change: dict[str, Any]) -> None:
        """The "log loss" toggle: the loss panel's scale, live or in the record's chart."""
        with self._lock:
            self.log_loss = bool(change["new"])
            if not self.progress.ended:
                self._draw()
                return
            self.figure = charts.training_figure(self.progress, self._title(), final=True, log_loss=self.log_loss)
            if self._handles is not None:
                self._handles[1].update(charts.final_bundle(self.figure), raw=True)

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
        self.resume_button = w.Button(description="Resume", icon="play", button_style="success",
                                      layout=w.Layout(width="100px", display="none"))
        environment.set_tooltip(self.resume_button, "Go on from the last checkpoint, as a new run shown here.")
        self.resume_button.on_click(lambda _: self.resume())
        self.log_loss_toggle = w.ToggleButton(value=False, description="log loss", layout=w.Layout(width="90px"))
        environment.set_tooltip(self.log_loss_toggle, "The loss panel on a log scale: late overfitting shows.")
        self.log_loss_toggle.observe(self._on_log_loss, names="value")
        self.messages_html = w.HTML()
        self.details = w.Accordion(children=[self.messages_html], layout=w.Layout(display="none"))
        self.details.selected_index = None  # collapsed (ipywidgets 7 opens the first pane otherwise)
        self.details.set_title(0, _messages_title(0))
        row = w.HBox([self.bar, self.progress_label, self.stop_button, self.resume_button, self.log_loss_toggle],
                     layout=w.Layout(align_items="center", gap="12px"))
        self.samples_html = w.HTML()
        controls = w.VBox([self.status_html, row, self.samples_html, self.details], layout=w.Layout(padding="6px 0"))
        controls._view_count = 0  # counted by the page that shows it (ipywidgets 7 and 8): see _open_chart
        controls.observe(self._on_shown, names="_view_count")
        return controls

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
        if p.ended:  # nothing left to stop: the button says so rather than "Stopping…"
            self.stop_button.disabled = True
            self.stop_button.description = "Stop"
        resumable = p.ended and self._resumable()
        self.resume_button.layout.display = None if resumable else "none"
        self.resume_button.disabled = not resumable
        shown = samples_html(p)
        if self.samples_html.value != shown:
            self.samples_html.value = shown
        if p.message_count != self._messages_shown:  # throttled with the redraws
            self._messages_shown = p.message_count
            self.details.set_title(0, _messages_title(p.message_count))
            self.messages_html.value = _messages_pre(p)
            self.details.layout.display = None

    def _resumable(self) -> bool:
        return bool(getattr(self.run, "resumable", False))

    def stop(self) -> None:
        """Stop the run at its next step (the Stop button)."""
        self.run.stop()
        if self.controls is not None:
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping…"

    def resume(self) -> Any:
        """Go on with this stopped or interrupted run from its last checkpoint (`nbtune.resume`, a new run);
        the dashboard follows the new run in the same place (the Resume button). Returns the new Run."""
        from nbtune.runner import resume

        if self.controls is not None:
            self.resume_button.disabled = True  # one click, one new run
        resumed = resume(self.run)
        with self._lock:  # its events wait until the live view is back in place
            self.progress.resume()
            self._follow(resumed)
            if self._handles is not None:
                self._handles[2].update(_empty(), raw=True)  # the summary of the run it continues
                self._show_live()
            else:
                self._update_controls()
        return resumed

    # ----- text -----------------------------------------------------------------------------------------------
    def _title(self) -> str:
        stage = "" if self.stage.name == "sft" else f" · {self.stage.name}"
        return f"{self.run.config.method.name}{stage} · {self.run.config.model.name_or_path} · run {self.run.id}"

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
        return (f"nbtune run {self.run.id} — {state_words(p.state, p.error, p.phase)} — step {p.step}/"
                f"{p.total_steps or '?'}, elapsed {format_duration(p.elapsed_s)}{eta}")

    def _status_html(self, static: bool = False) -> str:
        p = self.progress
        color = STATE_COLORS.get(p.state, "#757575")
        words = html.escape(state_words(p.state, None, p.phase))
        error = (f"<div style='color:#c62828;margin-top:4px;white-space:pre-wrap'>{html.escape(p.error)}</div>"
                 if p.error else "")
        extra = f" <span style='color:#555'>{self._progress_text()}</span>" if static else ""
        return (f"<div class='nbtune-status'><span style='background:{color};color:white;border-radius:10px;"
                f"padding:1px 9px;font-size:12px'>{html.escape(p.state)}</span> "
                f"<b>{html.escape(self.run.config.method.name)}</b> on "
                f"<code>{html.escape(self.run.config.model.name_or_path)}</code> · run <code>{html.escape(self.run.id)}"
                f"</code> — {words}{extra}{error}</div>")


def _messages_title(count: int) -> str:
    return f"Details ({count} library message{'' if count == 1 else 's'})"


def _messages_pre(progress: RunProgress) -> str:
    text = "\n".join(progress.messages)
    return f"<pre style='font-size:11px;max-height:300px;overflow:auto;white-space:pre-wrap'>{html.escape(text)}</pre>"


def samples_html(progress: RunProgress) -> str:
    """A text-to-image run's drawn samples: a row per evaluation shown (the first and the latest), a column per
    eval prompt ("" for runs that draw nothing)."""
    if not progress.samples:
        return ""
    prompts = progress.samples[-1][2]
    head = "".join(f"<th style='font-weight:normal;font-size:11px;max-width:90px'>{html.escape(p)}</th>"
                   for p in prompts)
    rows = "".join(
        f"<tr><td style='font-size:11px;white-space:nowrap'>step {step}</td>"
        + "".join(f"<td><img alt='step {step}: {html.escape(prompt)}' src='data:image/png;base64,{png}' "
                  "style='width:64px;image-rendering:pixelated'></td>" for png, prompt in zip(pngs, prompts, strict=False))
        + "</tr>" for step, pngs, _ in progress.samples)
    return (f"<table class='nbtune-samples' style='margin:4px 0'><tr><th style='font-size:11px'>drawn</th>{head}"
            f"</tr>{rows}</table>")


def details_html(progress: RunProgress) -> str:
    """The library messages of a run as a collapsed HTML <details> element ("" when there are none)."""
    if not progress.message_count:
        return ""
    return (f"<details class='nbtune-messages'><summary>{_messages_title(progress.message_count)}</summary>"
            f"{_messages_pre(progress)}</details>")


def summary_html(summary: RunSummary | None, stage: stages.Stage | None = None) -> str:
    rows = summary_rows(summary, stage)
    if not rows:
        return ""
    body = "".join(f"<tr><th style='text-align:left;padding:2px 12px 2px 0'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='nbtune-summary'><caption style='text-align:left'><b>Run summary</b></caption>{body}</table>"


def summary_text(summary: RunSummary | None, stage: stages.Stage | None = None) -> str:
    rows = summary_rows(summary, stage)
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
