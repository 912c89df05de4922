"""The live dashboard: honest states while a run starts, one step axis for every chart, a log loss scale and the
best eval, a live chart changed in place (never re-created), the stage's own charts (DPO rewards, GRPO reward),
Resume, and library noise kept in the run's log."""

from __future__ import annotations

import base64
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
from nbtune import TuneConfig, noise, stages
from nbtune.events import PHASES, Event, EventStream
from nbtune.records import RunSummary

pytest.importorskip("ipywidgets")

from nbtune.widgets import charts  # noqa: E402
from nbtune.widgets.dashboard import Dashboard  # noqa: E402
from nbtune.widgets.progress import RunProgress, state_words, summary_rows  # noqa: E402


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


# ----- the stage's own charts (DPO rewards, GRPO reward) -----------------------------------------------------

# Recorded from a 20-step DPO run with LoRA on nbtune:prefs (the embedded base, CPU, 2026-12-02): the metrics
# its step and eval events carry, the untuned model evaluated at step 0.
DPO_EVENTS = [
    ("started", {"total_steps": 20}),
    ("eval", {"step": 0, "loss": 0.693, "accuracy": 0.55, "preference_margin": 0.643, "reward_chosen": 0.0,
              "reward_rejected": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}),
    *(("step", {"step": n, "total_steps": 20, "loss": loss, "learning_rate": lr, "grad_norm": 1.0,
                "tokens_per_s": 800.0, "elapsed_s": float(n), "reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": margin, "reward_accuracy": accuracy})
      for n, loss, lr, chosen, rejected, margin, accuracy in (
          (5, 0.694, 0.003, -0.038, -0.046, 0.008, 0.35), (10, 0.701, 0.002, -0.064, -0.092, 0.027, 0.525),
          (15, 0.685, 0.001, 0.024, -0.018, 0.042, 0.525), (20, 0.635, 0.0, 0.131, 0.0, 0.131, 0.675))),
    ("eval", {"step": 20, "loss": 0.644, "accuracy": 0.55, "preference_margin": 1.761, "reward_chosen": 0.122,
              "reward_rejected": -0.011, "reward_accuracy": 0.741, "reward_margin": 0.133}),
]


def folded(events: list[tuple[str, dict[str, Any]]], stage: str) -> RunProgress:
    progress = RunProgress(stage=stages.STAGES[stage])
    for kind, data in events:
        progress.apply(kind, data)
    return progress


def traces_by_name(figure: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in figure["data"]}


def panel_titles(figure: dict[str, Any]) -> list[str]:
    return [note["text"].removeprefix("<b>").removesuffix("</b>") for note in figure["layout"]["annotations"]]


def test_a_dpo_run_draws_its_rewards_in_a_panel_of_their_own_on_the_shared_step_axis():
    figure = charts.training_figure(folded(DPO_EVENTS, "dpo"), "run", final=True)
    traces, layout = traces_by_name(figure), figure["layout"]
    assert panel_titles(figure)[6:] == ["DPO rewards", "Reward accuracy"]
    assert traces["reward chosen"]["x"] == [5, 10, 15, 20]
    assert traces["reward chosen"]["y"] == [-0.038, -0.064, 0.024, 0.131]
    assert traces["reward rejected"]["y"] == [-0.046, -0.092, -0.018, 0.0]
    assert traces["reward margin"]["y"] == [0.008, 0.027, 0.042, 0.131]
    assert traces["eval reward margin"]["x"] == [0, 20] and traces["eval reward margin"]["y"] == [0.0, 0.133]
    assert {traces[n]["xaxis"] for n in ("reward chosen", "reward rejected", "reward margin")} == {"x7"}
    assert traces["reward accuracy"]["xaxis"] == "x8" and traces["reward accuracy"]["y"][-1] == 0.675
    assert layout["yaxis8"]["range"] == [0, 1] and layout["yaxis8"]["autorange"] is False  # a share: 0 to 1
    assert layout["xaxis7"]["matches"] == "x" and layout["xaxis8"]["matches"] == "x"
    assert layout["height"] > 470  # a third row, the six panels keep their height


def test_a_dpo_runs_eval_accuracy_says_what_it_measures_and_it_shows_no_perplexity():
    events = [*DPO_EVENTS, ("eval", {"step": 21, "loss": 0.6, "perplexity": 1.8})]  # exp(DPO loss) means nothing
    figure = charts.training_figure(folded(events, "dpo"), "run")
    eval_panel = figure["layout"]["annotations"][5]
    assert panel_titles(figure)[5] == "Held-out preference accuracy"
    assert eval_panel["hovertext"] == stages.STAGES["dpo"].accuracy_means
    assert "eval perplexity" not in traces_by_name(figure)
    assert traces_by_name(figure)["eval accuracy"]["y"] == [0.55, 0.55]


def test_an_sft_run_has_no_stage_panel_even_when_an_event_carries_a_reward_like_number():
    progress = RunProgress()  # sft: what a run without a stage trains with
    for event in (step(1), step(2), evaluation(2, 1.5)):
        progress.apply(event.kind, {**event.data, "reward_margin": 0.5})
    figure = charts.training_figure(progress, "run", final=True)
    assert progress.stage_series == {} and len(panel_titles(figure)) == 6 and "xaxis7" not in figure["layout"]
    assert figure["layout"]["height"] == 470 and panel_titles(figure)[5] == "Eval perplexity"


def test_a_grpo_run_draws_its_reward_with_its_spread_the_completion_length_and_the_kl():
    events = [("step", {"step": n, "loss": 0.01, "reward": r, "reward_std": s, "completion_length": length,
                        "kl": kl}) for n, r, s, length, kl in ((1, 0.25, 0.5, 20.0, 0.0), (2, 0.5, 0.25, 12.0, 0.01))]
    figure = charts.training_figure(folded(events, "grpo"), "run")
    traces = traces_by_name(figure)
    assert panel_titles(figure)[6:] == ["GRPO reward", "Completion length (tokens)", "KL to the reference"]
    assert traces["reward"]["y"] == [0.25, 0.5]
    assert traces["reward + reward std"]["y"] == [0.75, 0.75] and traces["reward − reward std"]["y"] == [-0.25, 0.25]
    assert traces["reward + reward std"]["xaxis"] == traces["reward"]["xaxis"] == "x7"
    assert traces["completion length"]["y"] == [20.0, 12.0] and traces["kl"]["xaxis"] == "x9"


def test_the_saved_record_of_a_dpo_run_keeps_its_reward_panel_in_the_json_and_the_png():
    pil = pytest.importorskip("PIL.Image")
    import io

    dpo = charts.final_bundle(charts.training_figure(folded(DPO_EVENTS, "dpo"), "run", final=True), png=True)
    sft = charts.final_bundle(charts.training_figure(folded(DPO_EVENTS, "sft"), "run", final=True), png=True)
    assert "reward margin" in traces_by_name(dpo[charts.PLOTLY_MIME])
    assert "reward margin" not in traces_by_name(sft[charts.PLOTLY_MIME])
    heights = [pil.open(io.BytesIO(base64.b64decode(b["image/png"]))).size[1] for b in (dpo, sft)]
    assert heights[0] > heights[1]  # the PNG draws the third row too


def test_the_summary_names_the_stage_and_its_accuracy_in_words_without_a_perplexity_for_dpo():
    summary = RunSummary(state="finished", method="lora", final_eval_accuracy=0.95, final_perplexity=1.9)
    dpo = dict(summary_rows(summary, stages.STAGES["dpo"]))
    assert dpo["stage"] == "Direct preference optimisation (DPO)"
    assert dpo["final held-out preference accuracy"] == "0.95" and "final perplexity" not in dpo
    sft = dict(summary_rows(summary))
    assert sft["stage"] == "Supervised fine-tuning (SFT)" and sft["final perplexity"] == "1.9"


def test_the_live_figure_widget_gains_the_reward_panel_in_place_and_then_only_restyles_it():
    run = fake_run()
    run.config = TuneConfig().replace(**{"training.stage": "dpo", "data.source": "nbtune:prefs"})
    dash = shown(Dashboard(run, clock=FakeClock(), trailing=False, widgets=True))
    widget = dash.chart.widget
    sent: list[tuple[str, Any]] = []
    widget._send_addTraces_msg = lambda traces: sent.append(("add", [t["name"] for t in traces]))
    widget._send_update_msg = lambda restyle_data, relayout_data, trace_indexes=None, **_: sent.append(
        ("update", (sorted(restyle_data), sorted(relayout_data), trace_indexes)))
    for kind, data in DPO_EVENTS[:3]:
        dash._on_event(Event(kind, 0.0, data))
    added = [name for what, names in sent if what == "add" for name in names]
    assert {"reward chosen", "reward rejected", "reward margin", "reward accuracy"} <= set(added)
    assert widget.layout.xaxis7.matches == "x" and list(widget.layout.yaxis8.range) == [0, 1]
    assert "DPO rewards" in str(widget.layout.annotations[6].text) and widget is dash.chart.widget

    sent.clear()
    dash._on_event(Event(DPO_EVENTS[3][0], 1.0, DPO_EVENTS[3][1]))  # the next step: the same traces get their points, nothing is added
    assert sent and all(what == "update" for what, _ in sent)
    names = [t.name for t in widget.data]
    assert list(widget.data[names.index("reward margin")].y) == [0.008, 0.027]
    assert charts.point_counts(dash.figure)["reward margin"] == 2 and dash.figure["layout"]["height"] > 470


@pytest.mark.parametrize("task", ["image-cls", "image-to-text", "text-to-image"])
def test_an_image_run_charts_images_per_second_and_its_summary_counts_no_tokens(task):
    """Image runs count no tokens (their tokens_per_s is 0): the speed panel charts images per second, and the
    summary has no tokens / s row; a text run keeps tokens per second."""
    image = RunProgress(stage=stages.of_task("sft", task))
    text = RunProgress(stage=stages.of_task("sft", "causal-lm"))
    for progress in (image, text):
        for n in (1, 2):
            progress.apply("step", {**step(n).data, "tokens_per_s": 0.0 if progress is image else 500.0,
                                    "samples_per_s": 40.0 + n})
    figure = charts.training_figure(image, "run", final=True)
    assert panel_titles(figure)[3] == "Images / s" and "tokens/s" not in traces_by_name(figure)
    assert traces_by_name(figure)["images/s"]["y"] == [41.0, 42.0]
    words = panel_titles(charts.training_figure(text, "run", final=True))[3]
    assert words == "Tokens / s" and "images/s" not in traces_by_name(charts.training_figure(text, "run"))
    summary = RunSummary(state="finished", step=2, tokens_per_s=0.0, wall_time_s=3.0)
    assert "tokens / s" not in dict(summary_rows(summary, image.stage))
    assert dict(summary_rows(summary, text.stage))["tokens / s"] == "0"
