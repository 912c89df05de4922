"""What the notebook UI needs from the engine, kept free of widgets: form fields of the config sections, parsing
form values into a TuneConfig, throttling, bounded chart series, run progress and plain-words summaries.

Everything here is plain Python (no torch, no ipywidgets, no plotly), so it is cheap to import and to test.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from nbtune import config as config_module
from nbtune.config import ConfigError, TuneConfig
from nbtune.methods.registry import Field
from nbtune.units import format_bytes

# ----- the config sections as form fields --------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.task": config_module.TASKS,
    "model.dtype": config_module.DTYPES,
    "model.attn_implementation": config_module.ATTENTION,
    "training.scheduler": config_module.SCHEDULERS,
    "training.optimizer": config_module.OPTIMIZERS,
    "training.precision": config_module.PRECISIONS,
}

# One sentence per config field, shown as the field's tooltip.
FIELD_HELP: dict[str, str] = {
    "model.name_or_path": "A hub id (e.g. Qwen/Qwen2.5-0.5B), a local folder, or nbtune:tiny (the embedded model).",
    "model.task": "causal-lm: generate the target text; seq2seq: encoder-decoder; seq-cls: classify each row.",
    "model.dtype": "The dtype the base weights are loaded in (auto: the checkpoint's dtype where the device "
                   "computes it natively, else fp32).",
    "model.revision": "A branch, tag or commit of the hub model (empty: main).",
    "model.trust_remote_code": "Run the model repository's own Python code (only for repositories you trust).",
    "model.attn_implementation": "Attention kernel: sdpa (default), eager, or flash_attention_2 (GPU only).",
    "data.source": "A built-in dataset (nbtune:capitals), a hub id, or a local csv/jsonl/parquet file.",
    "data.split": "The split the training rows come from.",
    "data.text_column": "The column holding the input text (empty: the dataset's default).",
    "data.target_column": "The column appended as the target; only its tokens are trained on (causal LM).",
    "data.label_column": "The column holding the class label (seq-cls).",
    "data.prompt_template": "How a row becomes the input text, with {column} placeholders, e.g. 'Q: {question}\\nA:'.",
    "data.max_length": "Tokens per example; longer examples are truncated (the preview says how many).",
    "data.eval_split": "A split name for evaluation, or a fraction like 0.1 of the training rows held out.",
    "data.max_samples": "Use at most this many training rows (empty: all).",
    "data.max_eval_samples": "Use at most this many evaluation rows (empty: all).",
    "data.revision": "A branch, tag or commit of the hub dataset.",
    "training.learning_rate": "Peak learning rate (empty: the method's recommended rate).",
    "training.epochs": "Passes over the training rows (max_steps, when set, wins).",
    "training.max_steps": "Stop after this many optimizer steps (empty: run the epochs).",
    "training.micro_batch_size": "Examples per forward pass; the main driver of activation memory.",
    "training.gradient_accumulation_steps": "Micro-batches per optimizer step (effective batch = micro batch x this).",
    "training.warmup_ratio": "Fraction of the steps spent warming the learning rate up from 0.",
    "training.scheduler": "How the learning rate changes after warm-up.",
    "training.weight_decay": "Decoupled weight decay of the optimizer.",
    "training.dropout": "Dropout of the model (empty: keep the model's own).",
    "training.optimizer": "The optimizer; 8-bit and paged variants need bitsandbytes and a GPU.",
    "training.precision": "Mixed precision of the forward/backward (auto: bf16 where the device computes it "
                          "natively, fp16 on older GPUs, fp32 on other CPUs).",
    "training.gradient_checkpointing": "Recompute activations in the backward: much less memory, ~30% slower.",
    "training.max_grad_norm": "Clip the gradient norm to this (0 turns clipping off).",
    "training.seed": "Random seed of data order and initialisation.",
    "training.eval_every": "Evaluate every this many steps (empty: only at the end).",
    "training.log_every": "Record a training step event every this many steps.",
}

_KINDS = {"str": "str", "int": "int", "float": "float", "bool": "bool", "Any": "str", "str | float": "str"}


def section_fields(section: str) -> list[Field]:
    """The fields of one config section ("model", "data", "training") described like a method's fields.

    Types come from the section dataclass, choices from the config module's constants, help from FIELD_HELP.
    """
    cls = config_module.SECTIONS[section]
    out = []
    for f in dataclasses.fields(cls):
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        base = annotation.removesuffix("|None").replace("|", " | ")
        dotted = f"{section}.{f.name}"
        choices = _CHOICES.get(dotted, ())
        kind = "choice" if choices else _KINDS.get(base, "str")
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Field(f.name, kind, default, FIELD_HELP.get(dotted, ""), choices=choices, optional=optional))
    return out


def parse_value(dotted: str, field: Field, raw: Any) -> Any:
    """A form control's value as the config wants it. Text that cannot be parsed is kept as text, so the
    config's validation names the field and the bad value."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if field.kind in ("str-list", "int-list"):
        items = [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
        if field.kind == "int-list":
            items = [int(i) if i.lstrip("-").isdigit() else i for i in items]  # type: ignore[misc]
        return None if not items and field.optional else items
    if text == "" and field.optional:
        return None
    if field.kind in ("int", "float") or dotted == "data.eval_split":
        try:
            number = float(text)
        except ValueError:
            return text if dotted == "data.eval_split" or text else raw
        if field.kind == "int" and number.is_integer():
            return int(number)
        return number
    return raw if dotted == "data.prompt_template" else text


def display_value(field: Field, value: Any) -> Any:
    """A config value as a form control shows it (lists as comma-separated text, None as empty text)."""
    if field.kind in ("str-list", "int-list"):
        return ", ".join(str(v) for v in value or [])
    if value is None and field.kind in ("int", "float", "str"):
        return ""
    return value


def config_from_values(values: dict[str, Any]) -> tuple[TuneConfig | None, list[tuple[str, str]]]:
    """(config, []) when the dotted-name form values make a valid config, else (None, every problem)."""
    data: dict[str, Any] = {"model": {}, "method": {}, "data": {}, "training": {}}
    for dotted, value in values.items():
        section, _, name = dotted.partition(".")
        data[section][name] = value
    try:
        return TuneConfig.from_dict(data), []
    except ConfigError as err:
        return None, list(err.problems)


# ----- throttling and bounded series ---------------------------------------------------------------------------

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


# The traces a training chart shows: name -> (panel title, event kind, how to read y from the event's data).
def _memory_gib(data: dict[str, Any]) -> float | None:
    memory = data.get("memory") or {}
    value = memory.get("allocated", memory.get("rss"))
    return None if value is None else value / 2**30


TRACES: dict[str, tuple[str, str, Callable[[dict[str, Any]], Any]]] = {
    "train loss": ("Loss", "step", lambda d: d.get("loss")),
    "eval loss": ("Loss", "eval", lambda d: d.get("loss")),
    "learning rate": ("Learning rate", "step", lambda d: d.get("learning_rate")),
    "grad norm": ("Grad norm", "step", lambda d: d.get("grad_norm")),
    "tokens/s": ("Tokens / s", "step", lambda d: d.get("tokens_per_s")),
    "memory (GiB)": ("Memory (GiB)", "step", _memory_gib),
    "eval accuracy": ("Eval accuracy", "eval", lambda d: d.get("accuracy")),
    "eval perplexity": ("Eval perplexity", "eval", lambda d: d.get("perplexity")),
}


class RunProgress:
    """Everything a dashboard shows about a run, folded from its events one at a time in O(1) each."""

    def __init__(self, max_points: int = 2000):
        self.series = {name: Series(max_points) for name in TRACES}
        self.state = "queued"
        self.step = 0
        self.total_steps: int | None = None
        self.epoch: float | None = None
        self.elapsed_s: float | None = None
        self.started_at: float | None = None
        self.last_time: float | None = None
        self.error: str | None = None
        self.trainable_params: int | None = None
        self.events = 0

    def apply(self, kind: str, data: dict[str, Any], when: float | None = None) -> None:
        self.events += 1
        self.last_time = when
        if kind == "queued":
            self.state = "queued"
        elif kind == "started":
            self.state = "running"
            self.total_steps = data.get("total_steps")
            self.trainable_params = data.get("trainable_params")
            self.started_at = when
        elif kind in ("step", "eval"):
            self.state = "running"
            step = data.get("step") or 0
            self.step = max(self.step, step)
            if data.get("total_steps"):
                self.total_steps = data["total_steps"]
            if data.get("epoch") is not None:
                self.epoch = data["epoch"]
            if data.get("elapsed_s") is not None:
                self.elapsed_s = data["elapsed_s"]
            for name, (_, source, read) in TRACES.items():
                if source == kind:
                    value = read(data)
                    if value is not None:
                        self.series[name].append(step, value)
        elif kind in ("finished", "stopped", "failed"):
            self.state = kind
            self.error = data.get("error")
            if data.get("step") is not None:
                self.step = max(self.step, data["step"])

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "stopped", "failed", "interrupted")

    @property
    def eta_s(self) -> float | None:
        return eta_seconds(self.step, self.total_steps, self.elapsed_s)


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


STATE_WORDS = {
    "queued": "Waiting for the previous run to finish",
    "running": "Training",
    "finished": "Finished",
    "stopped": "Stopped on request; what was learned is kept in a checkpoint",
    "failed": "Failed",
    "interrupted": "Interrupted: the process that trained it ended before the run did",
}


def state_words(state: str, error: str | None = None) -> str:
    """The run's state as a sentence, with the error in plain words when it failed."""
    words = STATE_WORDS.get(state, state)
    if error:
        words += f": {error}"
    return words


def summary_rows(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The run summary as (label, formatted value) rows, in the order a reader wants them."""
    if not summary:
        return []

    def number(v: Any, digits: int = 4) -> str:
        return f"{v:.{digits}g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    rows: list[tuple[str, str]] = [("state", str(summary.get("state")))]
    spec = [
        ("method", "method", str), ("steps", "step", str), ("final eval loss", "final_eval_loss", number),
        ("best eval loss", "best_eval_loss", number), ("base eval loss", "base_eval_loss", number),
        ("final train loss", "final_train_loss", number), ("final eval accuracy", "final_eval_accuracy", number),
        ("final perplexity", "final_perplexity", number),
        ("trainable params", "trainable_params", lambda v: f"{v:,}"),
        ("trainable %", "trainable_percent", lambda v: f"{v:.3g}%"),
        ("wall time", "wall_time_s", lambda v: format_duration(v)),
        ("tokens / s", "tokens_per_s", lambda v: f"{v:,.0f}"),
        ("device", "device", str), ("precision", "precision", str), ("error", "error", str),
    ]
    for label, key, fmt in spec:
        value = summary.get(key)
        if value is not None:
            rows.append((label, fmt(value)))
    peak = summary.get("peak_memory") or {}
    peak_bytes = peak.get("peak_allocated") or peak.get("peak_rss")
    if peak_bytes:
        rows.append(("peak memory", format_bytes(peak_bytes)))
    return rows



# ----- data preview ------------------------------------------------------------------------------------------

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


def data_preview(config: TuneConfig, rows: int = 5) -> dict[str, Any]:
    """The builder's data preview: first formatted rows, row counts, token lengths and truncation, histogram."""
    from nbtune import data, models

    result = data.preview(config, tokenizer=models.load_tokenizer(config), rows=rows)
    result["histogram"] = histogram(result.get("token_lengths") or [])
    result["max_length"] = config.data.max_length
    return result


# ----- memory estimate ---------------------------------------------------------------------------------------

def gpu_choices() -> list[tuple[str, str]]:
    """(title, name) of every GPU of the estimator's catalogue."""
    from nbtune.estimator.gpus import GPUS

    return [(str(spec["title"]), name) for name, spec in GPUS.items()]


def estimate(config: TuneConfig, gpu: str | None = None) -> Any:
    """The instant-tier memory estimate of a config (nbtune.estimator.estimate_memory)."""
    from nbtune.estimator import estimate_memory

    return estimate_memory(config, gpu=gpu)


# ----- run listings ------------------------------------------------------------------------------------------

def run_rows(records: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per stored run: id, method, state, losses, time — what `%nbtune runs` lists."""
    out = []
    for r in records:
        summary = r.summary or {}
        out.append({
            "run": r.id, "method": r.meta.get("method"), "state": r.state,
            "final eval loss": summary.get("final_eval_loss"), "best eval loss": summary.get("best_eval_loss"),
            "trainable params": summary.get("trainable_params"), "wall time": format_duration(summary.get("wall_time_s"))
            if summary.get("wall_time_s") is not None else None,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.meta.get("created", 0))),
        })
    return out
