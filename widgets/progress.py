"""What a training dashboard shows, folded from a run's events: the chart traces (one table), bounded series,
a redraw throttle, progress with its ETA, and the run's state and summary in plain words.

Plain Python (no ipywidgets, no plotly, no torch), so it is cheap to import and to test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbtune.records import RunSummary
from nbtune.stages import STAGES, Stage
from nbtune.units import format_bytes


class Throttle:
    """Lets an action through at most once per `interval` seconds of `clock` (injectable for tests)."""

    def __init__(self, interval: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        """True (and the window restarts) if an action may run now."""
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class Series:
    """One chart trace: every point (for the final record) and a bounded view for live display.

    The view keeps every `stride`-th point; when it exceeds `max_points` it drops every other point and the
    stride doubles, so appending costs O(1) amortised and the view never exceeds `max_points` + 1.
    """

    def __init__(self, max_points: int = 2000):
        self.max_points = max_points
        self.x: list[float] = []
        self.y: list[float | None] = []
        self._view_x: list[float] = []
        self._view_y: list[float | None] = []
        self._stride = 1

    def __len__(self) -> int:
        return len(self.x)

    def append(self, x: float, y: float | None) -> None:
        self.x.append(x)
        self.y.append(y)
        if (len(self.x) - 1) % self._stride == 0:
            self._view_x.append(x)
            self._view_y.append(y)
            if len(self._view_x) > self.max_points:
                self._view_x, self._view_y = self._view_x[::2], self._view_y[::2]
                self._stride *= 2

    def truncate(self, last_x: float, inclusive: bool = True) -> None:
        """Keep only the points up to `last_x` (training went back there: a recovery resumed from a checkpoint)."""
        points = [(x, y) for x, y in zip(self.x, self.y, strict=True) if x < last_x or (inclusive and x == last_x)]
        if len(points) == len(self.x):
            return
        self.x, self.y, self._view_x, self._view_y, self._stride = [], [], [], [], 1
        for x, y in points:
            self.append(x, y)

    def view(self) -> tuple[list[float], list[float | None]]:
        """At most max_points points spread over the whole history, always ending with the latest."""
        xs, ys = list(self._view_x), list(self._view_y)
        if self.x and (not xs or xs[-1] != self.x[-1]):
            if len(xs) >= self.max_points:
                xs, ys = xs[:-1], ys[:-1]
            xs.append(self.x[-1])
            ys.append(self.y[-1])
        return xs, ys

    def full(self, max_points: int | None = None) -> tuple[list[float], list[float | None]]:
        """Every point, or an evenly spaced subset (with the last) when there are more than `max_points`."""
        n = len(self.x)
        if max_points is None or n <= max_points:
            return list(self.x), list(self.y)
        step = math.ceil(n / max_points)
        idx = list(range(0, n, step))
        if idx[-1] != n - 1:
            idx[-1] = n - 1
        return [self.x[i] for i in idx], [self.y[i] for i in idx]


# ----- the traces of the training chart ---------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """One line of the training chart: which panel it is drawn in, which event carries it, how y is read."""

    name: str
    panel: str  # one of PANELS
    event: str  # the event kind: "step" or "eval"
    read: Callable[[dict[str, Any]], Any]
    color: str


def _memory_gib(data: dict[str, Any]) -> float | None:
    memory = data.get("memory") or {}
    value = memory.get("allocated", memory.get("rss"))
    return None if value is None else value / 2**30


def _key(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda data: data.get(name)


PANELS = ("Loss", "Learning rate", "Grad norm", "Throughput", "Memory (GiB)", "Eval")
EVAL_TRACES = ("eval accuracy", "eval perplexity")  # the "Eval" panel shows whichever the run has
THROUGHPUT = {"tokens": ("tokens/s", "Tokens / s"), "images": ("images/s", "Images / s")}  # by Stage.throughput
TRACES = (
    Trace("train loss", "Loss", "step", _key("loss"), "#1f77b4"),
    Trace("eval loss", "Loss", "eval", _key("loss"), "#ff7f0e"),
    Trace("learning rate", "Learning rate", "step", _key("learning_rate"), "#2ca02c"),
    Trace("grad norm", "Grad norm", "step", _key("grad_norm"), "#d62728"),
    Trace("tokens/s", "Throughput", "step", _key("tokens_per_s"), "#9467bd"),
    Trace("images/s", "Throughput", "step", _key("samples_per_s"), "#9467bd"),
    Trace("memory (GiB)", "Memory (GiB)", "step", _memory_gib, "#8c564b"),
    Trace("eval accuracy", "Eval", "eval", _key("accuracy"), "#e377c2"),
    Trace("eval perplexity", "Eval", "eval", _key("perplexity"), "#17becf"),
)


# ----- the stage's own traces (DPO's rewards, GRPO's reward and KL) ------------------------------------------

@dataclass(frozen=True)
class StageMetric:
    """How the chart draws one metric a stage logs (a value of `Stage.logged`): its panel ("{stage}" becomes
    the stage's name, DPO), its colour, a 0-1 axis for shares, and a spread drawn as ± around another metric."""

    panel: str
    color: str = "#7f7f7f"
    share: bool = False  # a fraction: drawn on a 0-1 axis
    spread_of: str | None = None  # drawn as mean ± this around that metric's line, not as a line of its own


STAGE_METRICS = {
    "reward_chosen": StageMetric("{stage} rewards", "#2ca02c"),
    "reward_rejected": StageMetric("{stage} rewards", "#d62728"),
    "reward_margin": StageMetric("{stage} rewards", "#bcbd22"),
    "reward_accuracy": StageMetric("Reward accuracy", "#9467bd", share=True),
    "reward": StageMetric("{stage} reward", "#2ca02c"),
    "reward_std": StageMetric("{stage} reward", "#2ca02c", spread_of="reward"),
    "completion_length": StageMetric("Completion length (tokens)", "#8c564b"),
    "kl": StageMetric("KL to the reference", "#17becf"),
}


def stage_metric(name: str) -> StageMetric:
    """How `name` is drawn; a metric the table does not know gets a panel of its own under its name."""
    return STAGE_METRICS.get(name) or StageMetric(name.replace("_", " ").capitalize())


def stage_trace_name(metric: str, kind: str) -> str:
    """The trace of a stage metric from step events ("reward margin") or eval events ("eval reward margin")."""
    words = metric.replace("_", " ")
    return words if kind == "step" else f"eval {words}"


def accuracy_words(stage: Stage) -> str:
    """What the stage's eval accuracy measures, short enough for a label ("held-out preference accuracy")."""
    return stage.accuracy_means.split(":")[0]


# ----- a run's progress ---------------------------------------------------------------------------------------

ENDED = ("finished", "stopped", "failed", "interrupted")
MAX_MESSAGES = 200  # library messages kept for display (the run's log.txt has them all)
SAMPLE_ROWS = 4  # a text-to-image run's evaluations whose drawn samples are shown: the first and the latest


class RunProgress:
    """Everything a dashboard shows about a run, folded from its events one at a time in O(1) each.

    States: "queued" (another run holds the kernel's runner), "starting" (with `phase`, one of
    events.PHASES, or None before the first), "running", then one of ENDED. `stage` is the run's stage (sft when
    not given); each metric it logs (`Stage.logged`) gets a Series, named by `stage_trace_name`, once present.
    """

    def __init__(self, max_points: int = 2000, stage: Stage | None = None):
        self.max_points = max_points
        self.stage = stage or STAGES["sft"]
        self.series = {trace.name: Series(max_points) for trace in TRACES}
        self.stage_series: dict[str, Series] = {}  # the stage's own traces, in the order they first appear
        self.state = "queued"
        self.phase: str | None = None
        self.step = 0
        self.start_step = 0  # where this run's steps began (a resumed run continues a checkpoint's)
        self.best_eval: tuple[int, float] | None = None  # (step, loss): the lowest eval loss after step 0
        self.messages: list[str] = []  # the latest MAX_MESSAGES library messages (and nbtune's recoveries)
        self.recoveries: list[str] = []  # what the run went on from, in words ("out of memory at step 40: ...")
        self.message_count = 0
        self.total_steps: int | None = None
        self.epoch: float | None = None
        self.elapsed_s: float | None = None
        self.started_at: float | None = None
        self.last_time: float | None = None
        self.error: str | None = None
        self.trainable_params: int | None = None
        self.events = 0
        self.samples: list[tuple[int, list[str], list[str]]] = []  # (step, PNGs, prompts) of drawing evals

    def apply(self, kind: str, data: dict[str, Any], when: float | None = None) -> None:
        self.events += 1
        self.last_time = when
        if kind == "queued":  # position: runs ahead of it; none means it is starting, not waiting
            self.state = "queued" if (data.get("position") or 0) > 0 else "starting"
        elif kind == "phase":
            self.state, self.phase = "starting", data.get("phase")
        elif kind == "started":
            self.state = "running"
            self.total_steps = data.get("total_steps")
            self.trainable_params = data.get("trainable_params")
            self.started_at = when
            self.start_step = self.step
        elif kind in ("step", "eval"):
            self._measured(kind, data)
        elif kind == "message":
            self._message(f"[{data.get('source')}] {data.get('text')}")
        elif kind == "recovered":
            self._recovered(data)
        elif kind in ("finished", "stopped", "failed"):
            self.state = kind
            self.error = data.get("error")
            if data.get("step") is not None:
                self.step = max(self.step, data["step"])

    def _message(self, line: str) -> None:
        self.message_count += 1
        self.messages = [*self.messages[-(MAX_MESSAGES - 1):], line]

    def _recovered(self, data: dict[str, Any]) -> None:
        """A failure the run goes on from: said in the messages; the chart goes back to the resume step (the
        steps after it are trained again, the eval there is done again), as events.standing does."""
        text = str(data.get("text") or data.get("reason"))
        self.recoveries.append(text)
        self._message(f"[nbtune] {text}")
        resume = data.get("resume_step") or 0
        for trace in TRACES:
            self.series[trace.name].truncate(resume, inclusive=trace.event == "step")
        for name, series in self.stage_series.items():
            series.truncate(resume, inclusive=not name.startswith("eval "))
        if self.best_eval is not None and self.best_eval[0] >= resume:
            xs, ys = self.series["eval loss"].x, self.series["eval loss"].y
            self.best_eval = min(((int(x), y) for x, y in zip(xs, ys, strict=True) if x > 0 and y is not None),
                                 key=lambda point: point[1], default=None)
        self.state, self.step = "starting", resume

    def _measured(self, kind: str, data: dict[str, Any]) -> None:
        self.state = "running"
        step = data.get("step") or 0
        self.step = max(self.step, step)
        if data.get("total_steps"):
            self.total_steps = data["total_steps"]
        if data.get("epoch") is not None:
            self.epoch = data["epoch"]
        if data.get("elapsed_s") is not None:
            self.elapsed_s = data["elapsed_s"]
        for trace in TRACES:
            if trace.event == kind:
                value = trace.read(data)
                if value is not None:
                    self.series[trace.name].append(step, value)
        for metric in self.stage.logged.values():
            value = data.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = stage_trace_name(metric, kind)
                self.stage_series.setdefault(name, Series(self.max_points)).append(step, value)
        if kind == "eval" and data.get("samples"):  # text-to-image: what the evaluation drew
            self.samples = [*self.samples, (step, list(data["samples"]), list(data.get("sample_prompts") or []))]
            self.samples = self.samples[:1] + self.samples[1:][-(SAMPLE_ROWS - 1):]
        loss = data.get("loss")  # the best eval: the base at step 0 is no checkpoint of this training
        if kind == "eval" and step > 0 and loss is not None and (not self.best_eval or loss < self.best_eval[1]):
            self.best_eval = (step, loss)

    def resume(self) -> None:
        """The same chart goes on with a resumed run: back to starting, the points so far kept."""
        self.state, self.phase, self.error = "starting", None, None

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's pace (a resumed run's elapsed time counts from its own start)."""
        total = None if self.total_steps is None else self.total_steps - self.start_step
        return eta_seconds(self.step - self.start_step, total, self.elapsed_s)


def eta_seconds(step: int, total: int | None, elapsed: float | None) -> float | None:
    """Seconds left at the average pace so far, or None when it cannot be known yet."""
    if not total or elapsed is None:
        return None
    if step >= total:
        return 0.0
    if step <= 0:
        return None
    return elapsed / step * (total - step)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----- in plain words -------------------------------------------------------------------------------------------

STATE_WORDS = {
    "queued": "Waiting for the previous run to finish",
    "starting": "Starting…",
    "running": "Training",
    "finished": "Finished",
    "stopped": "Stopped on request; what was learned is kept in a checkpoint",
    "failed": "Failed",
    "interrupted": "Interrupted: the process that trained it ended before the run did",
}


PHASE_WORDS = {"loading model": "Loading the model…", "preparing data": "Preparing the data…",
               "loading weights": "Loading the model's weights…"}  # one per events.PHASES


def state_words(state: str, error: str | None = None, phase: str | None = None) -> str:
    """The run's state as a sentence (a starting run's phase), with the error in plain words when it failed."""
    if state == "starting":
        words = PHASE_WORDS.get(phase or "", STATE_WORDS["starting"])
    else:
        words = STATE_WORDS.get(state, state)
    if error:
        words += f": {error}"
    return words


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# (label, summary field, how it is written) of the rows after the state, in the order a reader wants them
SUMMARY_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("method", "method", str), ("steps", "step", str),
    ("final eval loss", "final_eval_loss", _number), ("best eval loss", "best_eval_loss", _number),
    ("base eval loss", "base_eval_loss", _number), ("final train loss", "final_train_loss", _number),
    ("final eval accuracy", "final_eval_accuracy", _number), ("final perplexity", "final_perplexity", _number),
    ("trainable params", "trainable_params", lambda v: f"{v:,}"),
    ("trainable %", "trainable_percent", lambda v: f"{v:.3g}%"),
    ("wall time", "wall_time_s", format_duration), ("tokens / s", "tokens_per_s", lambda v: f"{v:,.0f}"),
    ("device", "device", str), ("precision", "precision", str), ("error", "error", str),
)


def summary_rows(summary: RunSummary | None, stage: Stage | None = None) -> list[tuple[str, str]]:
    """The run summary as (label, formatted value) rows, in the order a reader wants them: the stage's title
    after the state, its eval accuracy in its own words, no perplexity where its loss is no language-model loss."""
    if summary is None:
        return []
    stage = stage or STAGES["sft"]
    rows = [("state", str(summary.state)), ("stage", stage.title)]
    for label, key, write in SUMMARY_ROWS:
        if getattr(summary, key) is None or (key == "final_perplexity" and not stage.language_model_loss) or (
                key == "tokens_per_s" and stage.throughput != "tokens"):  # an image run counts no tokens
            continue
        if key == "final_eval_accuracy":
            label = f"final {accuracy_words(stage)}"
        rows.append((label, write(getattr(summary, key))))
    for recovered in summary.recoveries:  # training.on_oom shrink, a compile that fell back to eager
        rows.append(("recovered", str(recovered.get("text") if isinstance(recovered, dict) else recovered)))
    if summary.recoveries and summary.micro_batch_size:
        rows.append(("micro-batch", f"{summary.micro_batch_size} × accumulation {summary.gradient_accumulation_steps}"))
    peak_bytes = summary.peak_memory.get("peak_allocated") or summary.peak_memory.get("peak_rss")
    if peak_bytes:
        rows.append(("peak memory", format_bytes(peak_bytes)))
    return rows
