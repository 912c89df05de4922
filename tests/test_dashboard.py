"""The live dashboard: honest states while a run starts, one step axis for every chart, a log loss scale and the
best eval, a live chart changed in place (never re-created), Resume, and library noise kept in the run's log."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerCallback

import nbtune
from nbtune import TuneConfig, noise
from nbtune.events import PHASES, Event, EventStream

pytest.importorskip("ipywidgets")

from nbtune.widgets import charts  # noqa: E402
from nbtune.widgets.dashboard import Dashboard  # noqa: E402
from nbtune.widgets.progress import RunProgress, state_words  # noqa: E402


def tiny(**changes: object) -> TuneConfig:
    """The embedded default, cut down to a few seconds of CPU training."""
    base = {"training.max_steps": 6, "training.log_every": 1, "training.eval_every": 3, "data.max_samples": 48,
            "data.max_eval_samples": 16, "training.micro_batch_size": 4}
    return TuneConfig().replace(**{**base, **changes})


def states_of(history: list[Event]) -> list[str]:
    """The states a dashboard folding these events shows, one per change (a starting run's phase included)."""
    progress, shown = RunProgress(), []
    for event in history:
        progress.apply(event.kind, event.data, event.time)
        state = f"starting: {progress.phase}" if progress.state == "starting" else progress.state
        if not shown or shown[-1] != state:
            shown.append(state)
    return shown


STARTING = ["starting: None"] + [f"starting: {phase}" for phase in PHASES]  # queued at position 0, then phases


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every event may redraw
        return self.now


def fake_run(status: str = "running") -> SimpleNamespace:
    return SimpleNamespace(id="fake", config=TuneConfig(), status=status, summary=None, done=False,
                           events=EventStream(history=[]), subscribe=lambda callback, replay=True: (lambda: None),
                           stop=lambda: None, wait=lambda timeout=None: None, resumable=False)


def shown(dash: Dashboard) -> Dashboard:
    """What a page showing the dashboard does: it counts the controls' views (a headless client never does)."""
    dash.controls._view_count = 1
    return dash


def step(n: int, loss: float | None = None, total: int = 100) -> Event:
    return Event("step", float(n), {"step": n, "total_steps": total, "loss": loss or 1 / n, "learning_rate": 1e-3,
                                    "grad_norm": 1.0, "tokens_per_s": 500.0, "elapsed_s": float(n),
                                    "memory": {"rss": 2**30}})


def evaluation(n: int, loss: float) -> Event:
    return Event("eval", float(n), {"step": n, "loss": loss, "perplexity": 2.0})


# ----- honest states while a run starts ------------------------------------------------------------------------

def test_a_launch_on_an_idle_runner_never_shows_queued_and_goes_through_the_phases(tmp_path: Path):
    run = nbtune.launch(tiny(), store=tmp_path)
    assert run.wait(timeout=300).status == "finished", run.error
    assert states_of(run.events.history) == [*STARTING, "running", "finished"]
    assert state_words("starting", None, "loading model") == "Loading the model…"
    assert state_words("starting", None, "preparing data") == "Preparing the data…"

    cached = nbtune.launch(tiny(), store=tmp_path)  # served from the store: straight to finished
    dash = Dashboard(cached, widgets=True)
    assert cached.cached and dash.progress.state == "finished" and dash.renders == 0 and dash.chart is None


def test_a_launch_while_another_run_trains_is_queued_then_goes_through_the_phases(tmp_path: Path):
    first = nbtune.launch(tiny(**{"training.max_steps": 400}), store=tmp_path)
    second = nbtune.launch(tiny(**{"training.seed": 7}), store=tmp_path)
    assert second.events.history[0].data["position"] == 1
    first.stop()
    assert second.wait(timeout=300).status == "finished", second.error
    assert states_of(second.events.history) == ["queued", *STARTING[1:], "running", "finished"]


def test_the_badge_says_what_a_starting_run_does(tmp_path: Path):
    dash = Dashboard(fake_run(), clock=FakeClock(), trailing=False, widgets=True)
    dash._on_event(Event("queued", 0.0, {"position": 0}))
    assert ">starting<" in dash.status_html.value and "Starting…" in dash.status_html.value
    dash._on_event(Event("phase", 1.0, {"phase": "loading model"}))
    assert "Loading the model…" in dash.status_html.value and "queued" not in dash.status_html.value
    dash._on_event(Event("started", 2.0, {"total_steps": 100}))
    assert ">running<" in dash.status_html.value and "Training" in dash.status_html.value


# ----- the charts ----------------------------------------------------------------------------------------------

def test_every_panel_shares_one_step_axis_from_zero_to_the_total_from_the_first_point():
    progress = RunProgress()
    progress.apply("started", {"total_steps": 150})
    progress.apply("eval", {"step": 0, "loss": 3.0, "perplexity": 20.0})  # one point: would autorange to -1..1
    figure = charts.training_figure(progress, "run")
    layout = figure["layout"]
    assert layout["xaxis"]["range"] == [0, 150] and layout["xaxis"]["autorange"] is False
    assert all(layout[f"xaxis{n}"]["matches"] == "x" for n in range(2, 7))
    assert {t["xaxis"] for t in figure["data"]} <= {"x", "x6"}  # eval loss on the loss panel, perplexity on Eval


def test_the_best_eval_is_a_star_at_the_lowest_eval_loss_after_the_base():
    progress = RunProgress()
    for n, loss in ((0, 1.0), (10, 2.0), (20, 1.2344), (30, 1.5)):  # step 0 is the untuned base, not a checkpoint
        progress.apply("eval", {"step": n, "loss": loss})
    best = next(t for t in charts.training_figure(progress, "run")["data"] if t["name"] == charts.BEST_EVAL)
    assert best["x"] == [20] and best["y"] == [1.2344] and best["marker"]["symbol"] == "star"
    assert best["text"] == ["best eval loss 1.234 at step 20"]


def test_a_live_redraw_sends_only_what_changed_to_the_same_figure_widget():
    dash = shown(Dashboard(fake_run(), clock=FakeClock(), trailing=False, widgets=True))
    widget = dash.chart.widget
    sent: list[tuple[str, Any]] = []
    widget._send_addTraces_msg = lambda traces: sent.append(("add", [t["name"] for t in traces]))
    widget._send_update_msg = lambda restyle_data, relayout_data, trace_indexes=None, **_: sent.append(
        ("update", (sorted(restyle_data), sorted(relayout_data), trace_indexes)))
    dash._on_event(Event("started", 0.0, {"total_steps": 100}))
    dash._on_event(evaluation(0, 3.0))
    dash._on_event(step(1))
    sent.clear()
    dash._on_event(step(2))
    names = [t.name for t in widget.data]
    step_traces = sorted(names.index(n) for n in ("train loss", "learning rate", "grad norm", "tokens/s",
                                                  "memory (GiB)"))
    assert sent == [("update", (["x", "y"], [], step_traces))]  # no layout, no eval trace, no new figure
    assert dash.chart.widget is widget and list(widget.data[names.index("train loss")].x) == [1, 2]

    sent.clear()
    dash.log_loss_toggle.value = True  # the toggle: only the loss axis type changes
    assert sent == [("update", ([], ["yaxis.type"], []))] and widget.layout.yaxis.type == "log"
    sent.clear()
    dash._on_event(evaluation(3, 2.5))  # the best eval appears: added with its first point
    assert ("add", [charts.BEST_EVAL]) in sent


def test_the_record_replaces_the_live_widget_keeps_the_toggle_and_carries_no_html(monkeypatch):
    monkeypatch.setenv("NBTUNE_STATIC_PNG", "0")  # plotly JSON and text only
    run = fake_run()
    dash = Dashboard(run, clock=FakeClock(), trailing=False, widgets=True)
    slots = [SimpleNamespace(shown=None) for _ in range(3)]
    for slot in slots:
        slot.update = lambda bundle, raw=True, slot=slot: setattr(slot, "shown", bundle)
    dash.show(slots)
    assert dash.chart is None and slots[1].shown is None  # no page shows it (yet): no FigureWidget, no chart
    shown(dash)
    widget = dash.chart.widget
    assert "application/vnd.jupyter.widget-view+json" in slots[1].shown  # the live FigureWidget
    dash.log_loss_toggle.value = True
    for n in (1, 2, 3):
        dash._on_event(step(n, total=3))
    dash._on_event(Event("message", 3.5, {"source": "transformers.modeling_utils", "text": "LOAD REPORT …"}))
    run.status = "finished"
    dash._on_event(Event("finished", 4.0, {"step": 3}))
    record = slots[1].shown
    assert set(record) == {charts.PLOTLY_MIME, "text/plain"}
    assert "<details" in slots[2].shown["text/html"] and "LOAD REPORT" in slots[2].shown["text/html"]
    assert record[charts.PLOTLY_MIME]["layout"]["yaxis"]["type"] == "log"
    assert widget.comm is None and dash.chart is None  # closed: a saved notebook carries no widget state for it


# ----- Resume ----------------------------------------------------------------------------------------------------

class ClickStopAt(TrainerCallback):
    """Clicks the dashboard's Stop button at the end of one step (what a user does, at a known step)."""

    def __init__(self, step: int, holder: dict[str, Dashboard]) -> None:
        self.step, self.holder = step, holder

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if state.global_step == self.step:
            while "dashboard" not in self.holder:  # the test makes it right after launching
                time.sleep(0.01)
            self.holder["dashboard"].stop_button.click()


def test_resume_on_the_dashboard_of_a_stopped_run_finishes_it_in_the_same_dashboard(tmp_path: Path):
    holder: dict[str, Dashboard] = {}
    config = tiny(**{"training.max_steps": 8, "training.eval_every": 4})
    first = nbtune.launch(config, store=tmp_path, callbacks=[ClickStopAt(3, holder)])
    dash = holder["dashboard"] = Dashboard(first, widgets=True)
    dash.wait(timeout=300)
    assert first.status == "stopped" and dash.progress.state == "stopped" and dash.progress.step == 3
    assert dash.resume_button.layout.display is None and not dash.resume_button.disabled

    dash.resume_button.click()
    resumed = dash.run
    assert resumed is not first and resumed.record.meta["resumed_from"] == first.id
    assert not dash.stop_button.disabled and dash.resume_button.layout.display == "none"
    dash.wait(timeout=300)
    assert resumed.status == "finished", resumed.error
    assert dash.progress.state == "finished" and dash.progress.step == 8 and dash.bar.value == 8
    assert [e.data["step"] for e in resumed.events.history if e.kind == "step"] == [4, 5, 6, 7, 8]
    assert states_of(resumed.events.history) == [*STARTING, "running", "finished"]
    assert "finished" in dash.status_html.value and resumed.id in dash.status_html.value
    assert list(dash.progress.series["train loss"].x) == [1, 2, 3, 4, 5, 6, 7, 8]  # one chart, both runs


def test_only_runs_that_can_go_on_offer_resume(tmp_path: Path):
    failed = nbtune.launch(tiny(**{"data.source": str(tmp_path / "missing.jsonl")}), store=tmp_path)
    dash = Dashboard(failed.wait(timeout=120), widgets=True)
    assert failed.status == "failed" and not failed.resumable  # no checkpoint: it would start again from 0
    assert dash.resume_button.layout.display == "none"


# ----- library noise -------------------------------------------------------------------------------------------

class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_classifier_without_its_head_reports_it_in_the_runs_log_not_on_stderr(tmp_path: Path, capfd):
    seen = Records()  # a handler of the user's on transformers' logger: it must not get the training thread's
    logging.getLogger("transformers").addHandler(seen)
    try:
        config = tiny(**{"model.task": "seq-cls", "data.source": "nbtune:regions", "training.max_steps": 2,
                         "training.eval_every": 2})
        run = nbtune.launch(config, store=tmp_path)
        assert run.wait(timeout=300).status == "finished", run.error
        logging.getLogger("transformers.modeling_utils").warning("said on the main thread")
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and not any("LOAD REPORT" in m for m in seen.messages)
    assert "said on the main thread" in seen.messages  # the user's own use of the library still speaks
    log_text = run.record.log_path.read_text()
    assert "LOAD REPORT" in log_text and "score.weight" in log_text and "MISSING" in log_text
    assert "\x1b[" not in log_text  # no terminal styling in the file
    messages = [e.data for e in run.events.history if e.kind == "message"]
    assert messages and messages[0]["source"] == "transformers.modeling_utils"

    dash = Dashboard(run, widgets=True)  # the dashboard (and its static record) shows them, collapsed
    assert dash.details.layout.display is None and dash.details.selected_index is None
    assert "library message" in dash.details.get_title(0) and "score.weight" in dash.messages_html.value
    from nbtune.widgets.dashboard import details_html

    assert details_html(dash.progress).startswith("<details") and "MISSING" in details_html(dash.progress)


def test_a_warning_on_the_training_thread_goes_to_the_log_and_one_on_the_main_thread_reaches_the_user(tmp_path):
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))

        def train() -> None:
            with noise.captured(tmp_path / "log.txt"):
                warnings.warn("a FutureWarning of the library", FutureWarning, stacklevel=1)
                capturing.set()
                main_done.wait(5)

        capturing, main_done = threading.Event(), threading.Event()
        worker = threading.Thread(target=train)
        worker.start()
        assert capturing.wait(5)
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)  # while the worker captures
        main_done.set()
        worker.join()
        warnings.warn("after the run", UserWarning, stacklevel=1)
    assert shown == ["the user's own warning", "after the run"]
    text = (tmp_path / "log.txt").read_text()
    assert "FutureWarning [warnings]" in text and "a FutureWarning of the library" in text
