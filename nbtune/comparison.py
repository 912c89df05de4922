"""Compare tuning methods side by side on the same model, data and budget, from cached runs.

`compare(base_config, methods=[...])` trains every variant one after another (finished ones are served from the
store), and returns a `Comparison`: a table (one row per variant), `best()` and the Pareto front. A comparison
re-opens from the store alone, without training or loading a model, and grows when a variant is added: only the
new one trains. Its charts and HTML report are drawn by `nbtune.report` from one `Table` per render.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune import report
from nbtune.config import TuneConfig
from nbtune.records import RunSummary
from nbtune.runner import Run, open_run
from nbtune.store import RunRecord, RunStore, cache_key, write_atomic
from nbtune.tasks import task

VariantSpec = TuneConfig | Mapping[str, Any] | str

# Columns where a larger value is better; every other numeric column is better when smaller.
HIGHER_IS_BETTER = ("eval_accuracy", "base_eval_accuracy", "tokens_per_s")
ESTIMATES_FILE = "estimates.json"  # memory estimates of compared configs, in the store root
COST_AXES = {"memory": "peak memory (bytes)", "time": "wall time (s)"}
# Run states that mean a variant produced no result, with the reason shown when the run recorded none.
FAILED_STATES = {"failed": "failed without a recorded reason",
                 "interrupted": "the process that trained it ended before the run did"}


def compare(base_config: TuneConfig | None = None, methods: Sequence[str] | None = None,
            variants: Mapping[str, VariantSpec] | None = None, store: RunStore | str | Path | None = None,
            train: bool = True, force: bool = False, progress: bool = True) -> Comparison:
    """Run every variant of `base_config` on the same data, model and budget and compare them.

    `methods` names registry methods (each with its registry defaults); `variants` maps a name to a TuneConfig,
    a method name, or dotted changes to the base (`{"lora-r4": {"method": "lora", "method.r": 4}}`). With
    neither, every built-in method that supports the base's task is compared. Finished variants are served from
    the store; with `train=False` nothing trains and missing variants show as "missing".
    """
    base = base_config if base_config is not None else TuneConfig()
    comparison = Comparison(base, {}, store=store)
    specs = _variant_specs(base, methods, variants)
    comparison.add(variants=specs, train=train, force=force, progress=progress)
    return comparison


def _variant_specs(base: TuneConfig, methods: Sequence[str] | None,
                   variants: Mapping[str, VariantSpec] | None) -> dict[str, VariantSpec]:
    from nbtune.methods import registry

    specs: dict[str, VariantSpec] = {}
    if methods is None and variants is None:
        methods = [m.name for m in registry.all_methods(include_generated=False) if base.model.task in m.tasks]
    for name in methods or ():
        registry.get(name)  # an unknown name fails here, naming the allowed ones
        specs[name] = name
    specs.update(variants or {})
    return specs


def variant_config(base: TuneConfig, spec: VariantSpec) -> TuneConfig:
    """The config of one variant: a TuneConfig as given, a method name, or dotted changes applied to `base`."""
    if isinstance(spec, TuneConfig):
        return spec
    if isinstance(spec, str):
        return base.replace(method=spec)
    if isinstance(spec, Mapping):
        return base.replace(**dict(spec))
    raise TypeError(f"a variant must be a TuneConfig, a method name or a dict of changes (got {type(spec).__name__})")


def failure_reason(state: str, error: str | None) -> str | None:
    """Why a variant in `state` produced no result (its recorded error, else the state's reason); None if it did."""
    return (error or FAILED_STATES[state]) if state in FAILED_STATES else None


def shown_name(name: str, state: str) -> str:
    """A variant's name as charts show it: failed ones say so."""
    return f"{name} ({state})" if state in FAILED_STATES else name


class Comparison:
    """Runs of several variants side by side: `.to_pandas()`, charts, `.best()`, `.to_html()`.

    `runs` maps a variant name to its Run, or to None when the variant has no finished run in the store yet.
    """

    def __init__(self, base_config: TuneConfig, runs: Mapping[str, Run | None],
                 configs: Mapping[str, TuneConfig] | None = None, store: RunStore | str | Path | None = None):
        self.base_config = base_config
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.runs: dict[str, Run | None] = dict(runs)
        self.configs: dict[str, TuneConfig] = dict(configs or {})
        for name, run in self.runs.items():
            if name not in self.configs and run is not None:
                self.configs[name] = run.config
        self.served_from_store: set[str] = {n for n, r in self.runs.items() if r is not None and r.cached}
        self._estimates = StoredEstimates(self.store.root)

    def __repr__(self) -> str:
        states = ", ".join(f"{name}: {self._state(name)}" for name in self.runs)
        return f"<nbtune.Comparison of {len(self.runs)} variants ({states})>"

    # ----- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, base_config: TuneConfig | None = None, methods: Sequence[str] | None = None,
                   variants: Mapping[str, VariantSpec] | None = None,
                   store: RunStore | str | Path | None = None) -> Comparison:
        """Re-open a comparison from the store alone: no training, no model loading (missing variants show)."""
        return compare(base_config, methods=methods, variants=variants, store=store, train=False, progress=False)

    @classmethod
    def from_runs(cls, runs: Iterable[Run | RunRecord | str], store: RunStore | str | Path | None = None,
                  names: Sequence[str] | None = None) -> Comparison:
        """Compare runs already in the store (Run handles, records or run ids); names default to the method."""
        store = store if isinstance(store, RunStore) else RunStore(store)
        handles = []
        for run in runs:
            if isinstance(run, str):
                run = store.get(run)
            handles.append(open_run(run) if isinstance(run, RunRecord) else run)
        if not handles:
            raise ValueError("Comparison.from_runs needs at least one run")
        labels = list(names) if names is not None else _unique([r.config.method.name for r in handles])
        if len(labels) != len(handles):
            raise ValueError(f"names must give one name per run ({len(handles)} runs, got {len(labels)} names)")
        return cls(handles[0].config, dict(zip(labels, handles, strict=True)), store=store)

    def add(self, methods: Sequence[str] | None = None, variants: Mapping[str, VariantSpec] | None = None,
            train: bool = True, force: bool = False, progress: bool = True) -> Comparison:
        """Add variants (trained one after another, finished ones served from the store); returns self."""
        specs = _variant_specs(self.base_config, methods, variants) if methods or variants else {}
        todo = {name: variant_config(self.base_config, spec) for name, spec in specs.items()}
        for index, (name, config) in enumerate(todo.items(), 1):
            self.configs[name] = config
            if train:
                self._train(name, config, force, progress=f"[{index}/{len(todo)}] {name}" if progress else None)
            else:
                self._serve(name, config)
        return self

    def _serve(self, name: str, config: TuneConfig) -> None:
        """The variant's finished run from the store, or None (missing) when there is none."""
        record = self.store.find_finished(cache_key(config).key)
        self.runs[name] = open_run(record) if record is not None else None
        if record is not None:
            self.served_from_store.add(name)

    def _train(self, name: str, config: TuneConfig, force: bool, progress: str | None) -> None:
        """Launch the variant (served from the store when finished before) and wait for it; `progress` prefixes
        the line printed when it ends (None prints nothing)."""
        from nbtune.runner import launch

        started = time.perf_counter()
        run = launch(config, store=self.store, force=force)
        if run.cached:
            self.served_from_store.add(name)
        else:
            self.served_from_store.discard(name)
        try:
            run.wait()
        except KeyboardInterrupt:  # stop the run in training too, so the device is free again
            run.stop()
            run.wait()
            raise
        self.runs[name] = run
        if progress is not None:
            how = "served from the store" if run.cached else f"trained in {time.perf_counter() - started:.0f}s"
            print(f"{progress}: {run.status}, {how}{self._metric_text(name)}", flush=True)

    # ----- the table -----------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.base_config.model.task

    @property
    def scores_accuracy(self) -> bool:
        """Whether the task is scored by eval accuracy (classification), else by eval loss and perplexity."""
        return task(self.task).metric == "accuracy"

    @property
    def metric(self) -> str:
        """The task metric column: eval_accuracy for classification, eval_perplexity for language modelling."""
        return "eval_accuracy" if self.scores_accuracy else "eval_perplexity"

    @property
    def quality(self) -> str:
        """The eval-quality column used by `best()` and the Pareto chart (higher accuracy, or lower eval loss)."""
        return "eval_accuracy" if self.scores_accuracy else "final_eval_loss"

    def _state(self, name: str) -> str:
        run = self.runs.get(name)
        return "missing" if run is None else run.status

    def _metric_text(self, name: str) -> str:
        summary = _summary(self.runs[name])
        if summary.error:
            return f" ({summary.error})"
        value = summary.final_eval_accuracy if self.scores_accuracy else summary.final_perplexity
        if value is None:
            return ""
        return f", eval accuracy {value:.3f}" if self.scores_accuracy else f", eval perplexity {value:.2f}"

    def failures(self) -> dict[str, str]:
        """The variants whose run failed or was interrupted, each with its reason (empty when none did)."""
        reasons = {name: failure_reason(run.status, run.error) for name, run in self.runs.items() if run is not None}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def estimate(self, name: str) -> dict[str, Any] | None:
        """A variant's memory estimate as {"total_bytes", "breakdown": [[category, bytes], ...]}, or None when
        the estimator cannot tell.

        Estimates are kept in the store (`estimates.json`), so a comparison re-opened later imports no torch.
        """
        return self._estimates.get(self.configs[name])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per variant, the raw numbers of the table."""
        return [self._row(name, config) for name, config in self.configs.items()]

    def _row(self, name: str, config: TuneConfig) -> dict[str, Any]:
        run = self.runs.get(name)
        summary = _summary(run)
        train_losses = [e["loss"] for e in _with_loss(run, "step")]
        estimated = summary.estimated_peak_bytes
        if estimated is None:
            estimated = (self.estimate(name) or {}).get("total_bytes")
        row = {
            "variant": name,
            "method": config.method.name,
            "state": self._state(name),
            "served_from_store": name in self.served_from_store,
            "learning_rate": summary.learning_rate if summary.learning_rate is not None else config.learning_rate,
            "trainable_params": summary.trainable_params,
            "total_params": summary.total_params,
            "trainable_percent": summary.trainable_percent,
            "estimated_peak_bytes": estimated,
            "measured_peak_bytes": summary.measured_peak_bytes,
            "wall_time_s": summary.wall_time_s,
            "tokens_per_s": summary.tokens_per_s,
            "tokens_seen": summary.tokens_seen,
            "steps": summary.step,
            "final_train_loss": summary.final_train_loss,
            "best_train_loss": min(train_losses) if train_losses else None,
            "final_eval_loss": summary.final_eval_loss,
            "best_eval_loss": summary.best_eval_loss,
        }
        if self.scores_accuracy:
            row["eval_accuracy"] = summary.final_eval_accuracy
            row["base_eval_accuracy"] = summary.base_eval_accuracy
        else:
            row["eval_perplexity"] = summary.final_perplexity
        row["artifact_bytes"] = summary.artifact_bytes
        row["error"] = summary.error
        row["run_id"] = run.id if run is not None else None
        return row

    def table(self) -> Table:
        """The rows as of now, with the quality they are judged by: what one render of charts and HTML reads."""
        return Table(self.rows(), self.quality)

    def to_pandas(self) -> Any:
        """The comparison table as a pandas DataFrame, one row per variant (indexed by variant name)."""
        return _frame(self.rows())

    def best(self, by: str | None = None) -> Run:
        """The finished run that is best by a table column (default: the task's eval quality; ties go to the
        lower eval loss)."""
        return self.runs[self.table().best(by or self.quality)]  # type: ignore[return-value]

    def pareto(self, cost: str = "memory") -> dict[str, bool]:
        """Which finished variants are non-dominated for `cost` ("memory" or "time") versus eval quality."""
        return self.table().pareto(cost)

    def fairness(self) -> list[str]:
        """What every variant shared (seed, data order, eval set, token budget) and what differed, as sentences."""
        summaries = [run.summary for run in map(self.runs.get, self.configs) if run is not None]
        return report.fairness(self.configs, [s for s in summaries if s is not None])

    # ----- charts and report: drawn by nbtune.report --------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {name: shown_name(name, self._state(name)) for name in self.runs}

    def loss_curves(self) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """Each run's step events and eval events that carry a loss, oldest first: what the loss chart draws."""
        return {name: (_with_loss(run, "step"), _with_loss(run, "eval")) for name, run in self.runs.items()}

    def memory_breakdowns(self) -> dict[str, dict[str, int]]:
        """Each variant's estimated peak memory by category ({category: bytes}; empty when no estimate)."""
        return {name: dict((self.estimate(name) or {}).get("breakdown") or []) for name in self.configs}

    def loss_chart(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6, show_eval: bool = True) -> Any:
        """Training loss curves overlaid (x: "step", "epoch" or "tokens"), smoothed by an exponential moving
        average (0 = raw), with eval loss as dashed lines."""
        return report.loss_chart(self.loss_curves(), self._labels(), x=x, log_y=log_y, smoothing=smoothing,
                                 show_eval=show_eval)

    def memory_chart(self) -> Any:
        """The estimated peak memory of each variant as a stacked bar of the estimator's categories."""
        return report.memory_chart(self.memory_breakdowns(), self._labels())

    def pareto_chart(self, cost: str = "memory") -> Any:
        """Eval quality against peak memory or wall time; the non-dominated variants are marked and joined."""
        return report.pareto_chart(self.table(), cost)

    def figures(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6,
                cost: str = "memory") -> dict[str, Any]:
        """Every chart of the comparison: loss curves, memory breakdown and Pareto chart."""
        return report.figures(self.loss_curves(), self.memory_breakdowns(), self.table(), x=x, log_y=log_y,
                              smoothing=smoothing, cost=cost)

    def table_html(self) -> str:
        """The table as an HTML fragment, numbers formatted for reading (raw ones: `to_pandas()`)."""
        return report.table_html(self.table())

    def _repr_html_(self) -> str:
        return report.notebook_html(self.fairness(), self.table())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        table = self.table()
        return {"text/plain": _frame(table.rows).to_string(), "text/html": report.notebook_html(self.fairness(), table)}

    def show(self, **chart_options: Any) -> None:
        """Display the table and every chart in a notebook (each chart as plotly JSON and a PNG, so the saved
        notebook shows it offline too)."""
        from IPython.display import display

        from nbtune.static_image import show_figure

        display(self)
        for fig in self.figures(**chart_options).values():
            show_figure(fig)

    def to_html(self, path: str | Path | None = None, title: str = "nbtune: which method?") -> str:
        """A self-contained HTML report (plotly.js inlined, works offline): fairness, table and charts.

        Written to `path` when given; the HTML is returned either way.
        """
        page = report.page_html(self, self.table(), title)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


@dataclass(frozen=True)
class Table:
    """The comparison's rows computed once, and what the charts and the HTML derive from them."""

    rows: list[dict[str, Any]]
    quality: str  # the eval-quality column that `best` and the Pareto front judge by

    @property
    def higher_is_better(self) -> bool:
        return self.quality in HIGHER_IS_BETTER

    def by_variant(self) -> dict[str, dict[str, Any]]:
        return {r["variant"]: r for r in self.rows}

    def failures(self) -> dict[str, str]:
        """The variants that failed or were interrupted, each with its reason."""
        reasons = {r["variant"]: failure_reason(r["state"], r.get("error")) for r in self.rows}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def labels(self) -> dict[str, str]:
        """Each variant's name as charts show it."""
        return {r["variant"]: shown_name(r["variant"], r["state"]) for r in self.rows}

    def best(self, by: str) -> str:
        """The finished variant best by column `by`; ties go to the lower eval loss."""
        rows = [r for r in self.rows if r["state"] == "finished" and r.get(by) is not None]
        if not rows:
            raise ValueError(f"no finished variant has a value for {by!r}; columns: {', '.join(self.rows[0])}")
        sign = 1 if by in HIGHER_IS_BETTER else -1
        return max(rows, key=lambda r: (sign * r[by], -_or_inf(r["final_eval_loss"])))["variant"]

    def cost_column(self, cost: str) -> str:
        """The column a cost axis reads: measured peak memory when every finished variant has one, else the
        estimate; wall time for "time"."""
        if cost not in COST_AXES:
            raise ValueError(f"cost must be one of {', '.join(COST_AXES)} (got {cost!r})")
        if cost == "time":
            return "wall_time_s"
        finished = [r for r in self.rows if r["state"] == "finished"]
        if finished and all(r["measured_peak_bytes"] is not None for r in finished):
            return "measured_peak_bytes"
        return "estimated_peak_bytes"

    def pareto(self, cost: str = "memory") -> dict[str, bool]:
        """Which finished variants are non-dominated for `cost` ("memory" or "time") versus eval quality."""
        column = self.cost_column(cost)
        rows = [r for r in self.rows if r["state"] == "finished" and r.get(column) is not None
                and r.get(self.quality) is not None]
        front = pareto_front([r[column] for r in rows], [r[self.quality] for r in rows],
                             higher_is_better=self.higher_is_better)
        return {r["variant"]: on for r, on in zip(rows, front, strict=True)}


def pareto_front(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[bool]:
    """For each point, whether it is non-dominated: no other point costs no more and is no worse in quality,
    and strictly better in one of the two."""
    sign = 1 if higher_is_better else -1
    points = [(c, sign * q) for c, q in zip(costs, qualities, strict=True)]
    return [not any(oc <= c and oq >= q and (oc < c or oq > q) for oc, oq in points) for c, q in points]


class StoredEstimates:
    """Memory estimates of compared configs, kept in the store root (`estimates.json`) so that a comparison
    re-opened later imports no torch."""

    def __init__(self, root: Path):
        self.path = root / ESTIMATES_FILE
        self._cache: dict[str, Any] | None = None

    def get(self, config: TuneConfig) -> dict[str, Any] | None:
        """{"total_bytes", "breakdown": [[category, bytes], ...]} in the estimator's order, or None when the
        estimator cannot tell."""
        from nbtune import __version__

        key = f"{__version__}:{config.content_hash}:{config.model.name_or_path}"
        cache = self._read()
        if key not in cache:
            cache[key] = _estimate(config)
            self._write()
        return cache[key]

    def _read(self) -> dict[str, Any]:
        if self._cache is None:
            try:
                self._cache = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self._cache))
        except OSError:  # a read-only store still compares; estimates are recomputed next time
            pass


def _estimate(config: TuneConfig) -> dict[str, Any] | None:
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.estimate import LABELS

    try:
        estimate = estimate_memory(config)
    except Exception:  # the estimate is informative; the comparison never fails for it
        return None
    return {"total_bytes": int(estimate.total_bytes),
            "breakdown": [[LABELS.get(k, k), int(v)] for k, v in estimate.breakdown.items()]}


def events_of(run: Run | None, kind: str) -> list[dict[str, Any]]:
    """The data of a run's events of one kind ("step", "eval", ...), oldest first; none for a missing run."""
    if run is None:
        return []
    return [e.data for e in list(run.events.history) if e.kind == kind]


def _with_loss(run: Run | None, kind: str) -> list[dict[str, Any]]:
    return [e for e in events_of(run, kind) if e.get("loss") is not None]


def _frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows).set_index("variant")


def _summary(run: Run | None) -> RunSummary:
    """The run's summary; a variant not run yet, or still training, reads as one that measured nothing."""
    return (run.summary if run is not None else None) or RunSummary()


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out
