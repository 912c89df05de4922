"""Compare tuning methods side by side on the same model, data and budget, from cached runs.

`compare(base_config, methods=[...])` trains every variant one after another (finished ones are served from the
store), and returns a `Comparison`: a table (one row per variant), `best()`, the Pareto front and a
recommendation. With `seeds=n` every variant trains n times (training.seed, seed+1, ...; each its own cached run)
and the table reports the quality as mean ± sample std. A comparison re-opens from the store alone, without
training or loading a model, and grows when a variant or a seed is added: only the new runs train. Its charts and
HTML report are drawn by `nbtune.report` from one `Table` per render.

Stages: variants may train different stages (`training.stage`: sft, dpo, grpo, ...). Each stage's runs are
judged by their own measure (`stage_quality`); where stages differ, those measures are not comparable, so
`best()` and the recommendation rank each stage's variants among themselves. Each stage's final metrics (its
`Stage.logged`, e.g. DPO's reward margin) are columns, empty for runs of other stages.

Ties: two variants tie when their mean qualities differ by no more than the larger of their spreads (the sample
std over seeds; 0 with one seed, so only equal qualities tie then). `best()` names one variant only when it beats
every other beyond that; otherwise it names the tied group.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune import report
from nbtune.config import TuneConfig
from nbtune.records import RunSummary
from nbtune.runner import Run, open_run
from nbtune.stages import STAGES, Stage, for_config
from nbtune.store import RunRecord, RunStore, cache_key, write_atomic
from nbtune.tasks import task

VariantSpec = TuneConfig | Mapping[str, Any] | str

# Columns where a larger value is better; every other numeric column is better when smaller.
# The last four are stages' metrics (Stage.logged names), whose direction the stage registry does not say.
HIGHER_IS_BETTER = ("eval_accuracy", "base_eval_accuracy", "tokens_per_s", "projected_tokens_per_s",
                    "reward_chosen", "reward_margin", "reward_accuracy", "reward")
# Columns whose meaning depends on the stage (a DPO loss is no cross-entropy): never ranked across stages.
STAGE_MEASURED = ("eval_accuracy", "base_eval_accuracy", "final_eval_loss", "best_eval_loss",
                  "final_train_loss", "best_train_loss", "eval_perplexity")
ESTIMATES_FILE = "estimates.json"  # memory estimates of compared configs, in the store root
COST_AXES = {"memory": "peak memory (bytes)", "time": "wall time (s)"}
# Run states that mean a variant produced no result, with the reason shown when the run recorded none.
FAILED_STATES = {"failed": "failed without a recorded reason",
                 "interrupted": "the process that trained it ended before the run did"}
# Measured columns that a variant's row averages over its seeds (the others are the same for every seed).
AVERAGED = ("wall_time_s", "tokens_per_s", "measured_peak_bytes", "final_train_loss", "best_train_loss",
            "final_eval_loss", "best_eval_loss", "eval_accuracy", "eval_perplexity")
# "About as good as the best" for the recommendation: within 2 accuracy points, or within 2 % of the eval loss.
NEAR_BEST_ACCURACY_POINTS = 0.02
NEAR_BEST_LOSS_SHARE = 0.02


def compare(base_config: TuneConfig | None = None, methods: Sequence[str] | None = None,
            variants: Mapping[str, VariantSpec] | None = None, store: RunStore | str | Path | None = None,
            train: bool = True, force: bool = False, progress: bool = True, seeds: int = 1,
            target_model: str | None = None, gpu: str | None = None) -> Comparison:
    """Run every variant of `base_config` on the same data, model and budget and compare them.

    `methods` names registry methods (the base's own method with the base's parameters, the others with their
    registry defaults); `variants` maps a name to a TuneConfig, a method name, or dotted changes to the base
    (`{"lora-r4": {"method": "lora", "method.r": 4}}`). With
    neither, every built-in method that supports the base's task is compared. `seeds=n` trains each variant n
    times (training.seed, seed+1, ...) and reports mean ± spread. `gpu` (a catalogue name such as "t4") is the
    card the recommendation is for; with `target_model` too, every variant's cost is projected to that model on
    that GPU (`nbtune.projection`). Finished runs are served from the store; with `train=False` nothing trains
    and missing variants show as "missing".
    """
    base = base_config if base_config is not None else TuneConfig()
    comparison = Comparison(base, {}, store=store, seeds=seeds, target_model=target_model, gpu=gpu)
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
    """The config of one variant: a TuneConfig as given, a method name (the base's own keeps its parameters), or
    dotted changes applied to `base`."""
    if isinstance(spec, TuneConfig):
        return spec
    if isinstance(spec, str):
        return base if spec == base.method.name else base.replace(method=spec)
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
    """Runs of several variants side by side: `.to_pandas()`, charts, `.best()`, `.recommendation()`, `.to_html()`.

    `seed_runs` maps a variant name to its runs, one per seed (None for a seed with no finished run in the store
    yet); `runs` holds each variant's first-seed run.
    """

    def __init__(self, base_config: TuneConfig, runs: Mapping[str, Run | None],
                 configs: Mapping[str, TuneConfig] | None = None, store: RunStore | str | Path | None = None,
                 seeds: int = 1, target_model: str | None = None, gpu: str | None = None):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (got {seeds!r})")
        self.base_config = base_config
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.seeds, self.target_model, self.gpu = seeds, target_model, gpu
        self.seed_runs: dict[str, list[Run | None]] = {name: [run] for name, run in runs.items()}
        self.configs: dict[str, TuneConfig] = dict(configs or {})
        for name, run in runs.items():
            if name not in self.configs and run is not None:
                self.configs[name] = run.config
        self._estimates = StoredEstimates(self.store.root)
        self.answers: Any = None  # the latest `generations(...)` table, shown in the report
        self._projections: dict[str, Any] | None = None

    def __repr__(self) -> str:
        states = ", ".join(f"{name}: {self._state(name)}" for name in self.seed_runs)
        return f"<nbtune.Comparison of {len(self.seed_runs)} variants ({states})>"

    @property
    def runs(self) -> dict[str, Run | None]:
        """Each variant's run of its first seed (None when it has none yet)."""
        return {name: runs[0] if runs else None for name, runs in self.seed_runs.items()}

    @property
    def served_from_store(self) -> set[str]:
        """The variants whose every seed was served from the store (none of them trained in this comparison)."""
        return {name for name, runs in self.seed_runs.items()
                if runs and all(run is not None and run.cached for run in runs)}

    # ----- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, base_config: TuneConfig | None = None, methods: Sequence[str] | None = None,
                   variants: Mapping[str, VariantSpec] | None = None,
                   store: RunStore | str | Path | None = None, seeds: int = 1, target_model: str | None = None,
                   gpu: str | None = None) -> Comparison:
        """Re-open a comparison from the store alone: no training, no model loading (missing variants show)."""
        return compare(base_config, methods=methods, variants=variants, store=store, train=False, progress=False,
                       seeds=seeds, target_model=target_model, gpu=gpu)

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
        labels = list(names) if names is not None else unique_names([r.config.method.name for r in handles])
        if len(labels) != len(handles):
            raise ValueError(f"names must give one name per run ({len(handles)} runs, got {len(labels)} names)")
        return cls(handles[0].config, dict(zip(labels, handles, strict=True)), store=store)

    def add(self, methods: Sequence[str] | None = None, variants: Mapping[str, VariantSpec] | None = None,
            train: bool = True, force: bool = False, progress: bool = True) -> Comparison:
        """Add variants, each with every seed (trained one after another, finished runs served from the store);
        returns self."""
        specs = _variant_specs(self.base_config, methods, variants) if methods or variants else {}
        todo = {name: variant_config(self.base_config, spec) for name, spec in specs.items()}
        self._projections = None
        for index, (name, config) in enumerate(todo.items(), 1):
            self.configs[name] = config
            runs: list[Run | None] = []
            for seeded in self.seed_configs(name):
                label = f"[{index}/{len(todo)}] {name}" + (f" seed {seeded.training.seed}" if self.seeds > 1 else "")
                runs.append(self._train(seeded, force, label if progress else None) if train
                            else self._serve(seeded))
            self.seed_runs[name] = runs
        return self

    def seed_configs(self, name: str) -> list[TuneConfig]:
        """The configs of a variant's seeds: its own, then with training.seed + 1, + 2, ..."""
        config = self.configs[name]
        first = config.training.seed
        return [config] + [config.replace(**{"training.seed": first + i}) for i in range(1, self.seeds)]

    def _serve(self, config: TuneConfig) -> Run | None:
        """The config's finished run from the store, or None (missing) when there is none."""
        record = self.store.find_finished(cache_key(config).key)
        return open_run(record) if record is not None else None

    def _train(self, config: TuneConfig, force: bool, progress: str | None) -> Run:
        """Launch the config (served from the store when finished before) and wait for it; `progress` prefixes
        the line printed when it ends (None prints nothing)."""
        from nbtune.runner import launch

        started = time.perf_counter()
        run = launch(config, store=self.store, force=force)
        try:
            run.wait()
        except KeyboardInterrupt:  # stop the run in training too, so the device is free again
            run.stop()
            run.wait()
            raise
        if progress is not None:
            how = "served from the store" if run.cached else f"trained in {time.perf_counter() - started:.0f}s"
            print(f"{progress}: {run.status}, {how}{self._metric_text(run)}", flush=True)
        return run

    # ----- the table -----------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.base_config.model.task

    @property
    def scores_accuracy(self) -> bool:
        """Whether the task is scored by eval accuracy (classification, caption exact match), else by eval loss
        and perplexity."""
        return task(self.task).metric is not None

    @property
    def metric(self) -> str:
        """The task metric column: eval_accuracy for classification, eval_perplexity for language modelling."""
        return "eval_accuracy" if self.scores_accuracy else "eval_perplexity"

    @property
    def stages(self) -> dict[str, Stage]:
        """Each variant's stage (`training.stage`)."""
        return {name: for_config(config) for name, config in self.configs.items()}

    @property
    def qualities(self) -> dict[str, str]:
        """Each stage the variants train (in their order), with the column its variants are judged by."""
        present = list(self.stages.values()) or [for_config(self.base_config)]
        return {stage.name: stage_quality(self.task, stage) for stage in present}

    @property
    def quality(self) -> str:
        """The eval-quality column used by `best()` and the Pareto chart (higher accuracy, or lower eval
        loss); where stages differ, the first variant's stage's (`qualities` holds each stage's)."""
        return next(iter(self.qualities.values()))

    @property
    def target(self) -> Target | None:
        """The GPU (and target model) the recommendation is for, or None when no `gpu` was chosen."""
        if self.gpu is None:
            return None
        from nbtune.estimator.gpus import gpu_bytes

        title, size = gpu_bytes(self.gpu)
        return Target(self.gpu, title, size, self.target_model)

    def _state(self, name: str) -> str:
        """A variant's state: finished when every seed finished, else the state of its first seed that did not."""
        states = ["missing" if run is None else run.status for run in self.seed_runs.get(name) or [None]]
        return next((state for state in states if state != "finished"), "finished")

    def _metric_text(self, run: Run) -> str:
        summary = _summary(run)
        if summary.error:
            return f" ({summary.error})"
        accuracy = stage_quality(self.task, STAGES[run.config.training.stage]) == "eval_accuracy"
        value = summary.final_eval_accuracy if accuracy else summary.final_perplexity
        if value is None:
            return ""
        return f", eval accuracy {value:.3f}" if accuracy else f", eval perplexity {value:.2f}"

    def failures(self) -> dict[str, str]:
        """The variants with a seed that failed or was interrupted, each with its reason (empty when none did)."""
        reasons = {name: next((failure_reason(r.status, r.error) for r in runs
                               if r is not None and r.status in FAILED_STATES), None)
                   for name, runs in self.seed_runs.items()}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def estimate(self, name: str) -> dict[str, Any] | None:
        """A variant's memory estimate as {"total_bytes", "breakdown": [[category, bytes], ...]}, or None when
        the estimator cannot tell.

        Estimates are kept in the store (`estimates.json`), so a comparison re-opened later imports no torch.
        """
        return self._estimates.get(self.configs[name])

    def projections(self) -> dict[str, Any]:
        """Each variant's `nbtune.projection.Projection` to `target_model` on `gpu`, computed once per set of
        variants; empty without both."""
        if self.target_model is None or self.gpu is None:
            return {}
        if self._projections is None:
            self._projections = self._estimates.projections(self.configs, self.target_model, self.gpu)
        return self._projections

    def rows(self) -> list[dict[str, Any]]:
        """One dict per variant, the raw numbers of the table (measured ones averaged over the seeds)."""
        projections = self.projections()
        return [self._row(name, projections.get(name)) for name in self.configs]

    def _row(self, name: str, projection: Any) -> dict[str, Any]:
        configs = self.seed_configs(name)
        runs = list(self.seed_runs.get(name) or [])[:len(configs)]
        runs += [None] * (len(configs) - len(runs))
        quality = stage_quality(self.task, STAGES[configs[0].training.stage])
        metrics = stage_metrics(self.qualities)
        seed_rows = [self._seed_row(name, c, r, metrics) for c, r in zip(configs, runs, strict=True)]
        row = aggregate(seed_rows, quality, AVERAGED + tuple(metrics))
        row.update(self._target_columns(row, projection))
        return row

    def _seed_row(self, name: str, config: TuneConfig, run: Run | None,
                  metrics: Sequence[str]) -> dict[str, Any]:
        """The numbers of one seed's run, with the final value of each stage metric in `metrics` (None for a
        metric of another stage)."""
        summary = _summary(run)
        train_losses = [e["loss"] for e in _with_loss(run, "step")]
        estimated = summary.estimated_peak_bytes
        if estimated is None:
            estimated = (self.estimate(name) or {}).get("total_bytes")
        row = {
            "variant": name,
            "method": config.method.name,
            "stage": config.training.stage,
            "state": "missing" if run is None else run.status,
            "served_from_store": run is not None and run.cached,
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
        judged = set(self.qualities.values())
        if "eval_accuracy" in judged:
            row["eval_accuracy"] = summary.final_eval_accuracy
            row["base_eval_accuracy"] = summary.base_eval_accuracy
        if "final_eval_loss" in judged:
            row["eval_perplexity"] = summary.final_perplexity
        row.update(final_metrics(run, metrics))
        row["artifact_bytes"] = summary.artifact_bytes
        row["error"] = summary.error
        row["run_id"] = run.id if run is not None else None
        return row

    def _target_columns(self, row: Mapping[str, Any], projection: Any) -> dict[str, Any]:
        """Whether the variant fits the chosen GPU, and with a target model its projected cost there."""
        target = self.target
        if target is None:
            return {}
        if target.model is None:
            peak = row["estimated_peak_bytes"]
            return {"fits": None if peak is None else peak <= target.gpu_bytes}
        error = "no projection" if projection is None else projection.error
        usable = projection is not None and projection.error is None
        return {"projected_peak_bytes": projection.peak_bytes if usable else None,
                "fits": projection.fits if usable else None,
                "projected_step_time_s": projection.step_time_s if usable else None,
                "projected_tokens_per_s": projection.tokens_per_s if usable else None,
                "projection_error": error}

    def table(self) -> Table:
        """The rows as of now, with the quality they are judged by: what one render of charts and HTML reads."""
        return Table(self.rows(), self.quality, self.target, self.qualities, self.task)

    def to_pandas(self) -> Any:
        """The comparison table as a pandas DataFrame, one row per variant (indexed by variant name)."""
        return _frame(self.rows())

    def best(self, by: str | None = None, stage: str | None = None) -> Best:
        """The finished variant best by a table column (default: the eval quality), or the variants tied for
        best when none beats the others beyond the spread: `.tied`, `.variants`, `.run`, `str()`. Where the
        variants' stages differ, an eval measure ranks only within one: `stage` names it."""
        table = self.table()
        if stage is not None or (table.mixed_stages and (by is None or by in STAGE_MEASURED)):
            table = table.of_stage(stage, by)
        by = by or table.quality
        names = table.leaders(by)
        runs = self.runs
        return Best(names, [runs[n] for n in names], by, report.best_text(table, names, by))  # type: ignore[misc]

    def recommendation(self) -> str:
        """Which method to use, in one paragraph derived from the table: for the chosen GPU, the best quality
        that fits, the cheapest within a small margin of it, and why."""
        return report.recommendation_text(self.table())

    def generations(self, prompts: str | Sequence[str], expected: Sequence[str] | None = None,
                    **settings: Any) -> Any:
        """The same prompts answered by the base and by every variant's run side by side (classification: each
        run's predicted labels, with accuracy and confusion when `expected` holds the true labels), as a
        `generation.SideBySide` kept in the store: asking again loads no model. Each run answers as it was
        trained (runs of different stages too): chat-templated where it trained on conversations. The HTML
        report shows the latest one asked for."""
        from nbtune.generation import side_by_side

        self.answers = side_by_side(self.runs, prompts, base=self.base_config, expected=expected, **settings)
        return self.answers

    def pareto(self, cost: str = "memory") -> dict[str, bool]:
        """Which finished variants are non-dominated for `cost` ("memory" or "time") versus eval quality (each
        stage's variants among themselves where stages differ)."""
        return self.table().pareto(cost)

    def fairness(self) -> list[str]:
        """What every variant shared (seed, data order, eval set, token budget) and what differed, as sentences."""
        summaries = [run.summary for runs in self.seed_runs.values() for run in runs[:1] if run is not None]
        lines = report.fairness(self.configs, [s for s in summaries if s is not None])
        if self.seeds > 1:
            first = self.base_config.training.seed
            lines.append(f"Every variant trained {self.seeds} times, with seeds {first}–{first + self.seeds - 1}; "
                         "the table shows the mean over seeds, ± the sample standard deviation.")
        return lines

    # ----- charts and report: drawn by nbtune.report --------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {name: shown_name(name, self._state(name)) for name in self.seed_runs}

    def loss_curves(self) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """Each variant's first-seed step events and eval events that carry a loss, oldest first: what the loss
        chart draws."""
        return {name: (_with_loss(run, "step"), _with_loss(run, "eval")) for name, run in self.runs.items()}

    def memory_breakdowns(self) -> dict[str, dict[str, int]]:
        """Each variant's estimated peak memory by category ({category: bytes}; empty when no estimate)."""
        return {name: dict((self.estimate(name) or {}).get("breakdown") or []) for name in self.configs}

    def loss_chart(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6, show_eval: bool = True) -> Any:
        """Training loss curves overlaid (x: "step", "epoch" or "tokens"), smoothed by an exponential moving
        average (0 = raw), with eval loss as dashed lines."""
        return report.loss_chart(self.loss_curves(), self._labels(), x=x, log_y=log_y, smoothing=smoothing,
                                 show_eval=show_eval, table=self.table())

    def memory_chart(self) -> Any:
        """Peak memory of each variant: projected to the target model and GPU when one is given, else the
        estimate as a stacked bar of the estimator's categories."""
        return report.memory_chart(self.memory_breakdowns(), self._labels(), table=self.table())

    def quality_chart(self, stage: str | None = None) -> Any:
        """Eval quality (mean ± spread over seeds) against the trainable share of parameters, log x; where
        stages differ, of one stage's variants (default: the first variant's)."""
        return report.quality_chart(self._charted(stage))

    def pareto_chart(self, cost: str = "memory", stage: str | None = None) -> Any:
        """Eval quality against peak memory or wall time; the non-dominated variants are marked and joined;
        where stages differ, of one stage's variants (default: the first variant's)."""
        return report.pareto_chart(self._charted(stage), cost)

    def _charted(self, stage: str | None) -> Table:
        table = self.table()
        return table.of_stage(stage or next(iter(table.qualities))) if table.mixed_stages or stage else table

    def figures(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6,
                cost: str = "memory") -> dict[str, Any]:
        """Every chart of the comparison: loss curves, memory, quality vs trainable share, and Pareto chart."""
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
class Target:
    """The GPU a comparison's recommendation is for, and the model its costs are projected to (None: the
    compared model itself)."""

    gpu: str  # as chosen: "t4", "a100-80gb", "custom:48"
    gpu_title: str
    gpu_bytes: int  # usable memory
    model: str | None = None


@dataclass(frozen=True)
class Best:
    """The best variant by a column, or the variants tied for best (best mean first) when none beats the
    others beyond the spread."""

    variants: list[str]
    runs: list[Run]
    by: str
    text: str  # in words, with the figures: what `str(best)` prints

    @property
    def tied(self) -> bool:
        return len(self.variants) > 1

    @property
    def run(self) -> Run:
        """The one best run; a tie has none (pick from `.runs`, or follow the recommendation)."""
        if self.tied:
            raise ValueError(f"no single best by {self.by}: {', '.join(self.variants)} tie (their means differ by "
                             "no more than the larger spread); pick one of .runs, or follow the recommendation")
        return self.runs[0]

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Recommendation:
    """What the recommendation paragraph says, as variant names (worded by `nbtune.report`)."""

    variant: str | None  # the method to use: the cheapest of those near the best; None when none fits
    leaders: list[str]  # the best quality among the variants that fit: one, or the tied group
    runner_up: str | None  # the best of the others, which the single leader beats beyond the spread
    near: list[str]  # every variant that fits within the near-best margin of the best mean, cheapest first
    unfit: list[str]  # finished variants that do not fit the chosen GPU
    unknown: list[str]  # finished variants with no projection to the target model (their fit is unknown)
    cost: str  # the column "cheapest" is judged by


@dataclass(frozen=True)
class Table:
    """The comparison's rows computed once, and what the charts and the HTML derive from them."""

    rows: list[dict[str, Any]]
    quality: str  # the eval-quality column that `best` and the Pareto front judge by
    target: Target | None = None
    qualities: Mapping[str, str] = field(default_factory=dict)  # each stage of the rows -> its quality column
    task: str = "causal-lm"  # model.task of the variants

    @property
    def mixed_stages(self) -> bool:
        """Whether the rows train different stages (then each stage's rows are judged among themselves)."""
        return len(self.qualities) > 1

    def quality_of(self, row: Mapping[str, Any]) -> str:
        """The quality column a row is judged by: its stage's."""
        return self.qualities.get(row.get("stage"), self.quality)

    def of_stage(self, stage: str | None, by: str | None = None) -> Table:
        """The rows of one stage, judged by that stage's quality; a ValueError names the stages when `stage`
        is None or none of them (`by`: the column that was asked to rank across stages)."""
        known = ", ".join(self.qualities)
        if stage is None:
            raise ValueError(f"the variants train different stages ({known}), and {by or 'the eval quality'} "
                             "measures something else in each: name one stage (stage=...)")
        if stage not in self.qualities:
            raise ValueError(f"stage {stage!r} is not one of the compared stages ({known})")
        rows = [r for r in self.rows if r.get("stage") == stage] if self.mixed_stages else self.rows
        return Table(rows, self.qualities[stage], self.target, {stage: self.qualities[stage]}, self.task)

    def per_stage(self) -> dict[str, Table]:
        """One table per stage, of its rows judged by its own quality (just this table when stages agree)."""
        if not self.mixed_stages:
            return {next(iter(self.qualities), ""): self}
        return {stage: self.of_stage(stage) for stage in self.qualities}

    @property
    def higher_is_better(self) -> bool:
        return self.quality in HIGHER_IS_BETTER

    @property
    def projected(self) -> bool:
        """Whether costs are projected to a target model (else they are the compared model's own)."""
        return self.target is not None and self.target.model is not None

    @property
    def cheapness(self) -> str:
        """The column "cheapest" is judged by: the projected peak on the target, else the trainable share (the
        small model's own peak is mostly fixed overhead and says little)."""
        return "projected_peak_bytes" if self.projected else "trainable_percent"

    def by_variant(self) -> dict[str, dict[str, Any]]:
        return {r["variant"]: r for r in self.rows}

    def failures(self) -> dict[str, str]:
        """The variants that failed or were interrupted, each with its reason."""
        reasons = {r["variant"]: failure_reason(r["state"], r.get("error")) for r in self.rows}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def labels(self) -> dict[str, str]:
        """Each variant's name as charts show it."""
        return {r["variant"]: shown_name(r["variant"], r["state"]) for r in self.rows}

    def spread(self, row: Mapping[str, Any], by: str) -> float:
        """The uncertainty of a row's value of `by`: the quality's sample std over seeds, else 0."""
        return (row.get("quality_std") or 0.0) if by == self.quality_of(row) else 0.0

    def ties(self, a: Mapping[str, Any], b: Mapping[str, Any], by: str) -> bool:
        """Whether two rows tie on `by`: their values differ by no more than the larger of their spreads."""
        return abs(a[by] - b[by]) <= max(self.spread(a, by), self.spread(b, by)) + 1e-12  # float rounding

    def scored(self, by: str) -> list[dict[str, Any]]:
        """The finished rows that have a value of `by`."""
        return [r for r in self.rows if r["state"] == "finished" and r.get(by) is not None]

    def ranked(self, rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
        """`rows` best first by `by` (equal values: the lower eval loss first, where the rows share a stage:
        one stage's loss says nothing about another's)."""
        sign = 1 if by in HIGHER_IS_BETTER else -1

        def loss(row: Mapping[str, Any]) -> float:
            return 0.0 if self.mixed_stages else _or_inf(row.get("final_eval_loss"))

        return sorted(rows, key=lambda r: (-sign * r[by], loss(r)))

    def leaders(self, by: str | None = None, among: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """The best variant by `by` (default: the quality), or every variant tied with it, best first."""
        by = by or self.quality
        rows = self.ranked(list(among) if among is not None else self.scored(by), by)
        if not rows:
            columns = ", ".join(self.rows[0]) if self.rows else "none"
            raise ValueError(f"no finished variant has a value for {by!r}; columns: {columns}")
        return [r["variant"] for r in rows if r is rows[0] or self.ties(rows[0], r, by)]

    def near_best(self, rows: Sequence[dict[str, Any]], best: float) -> list[dict[str, Any]]:
        """The rows whose quality is within the near-best margin of `best`."""
        margin = NEAR_BEST_ACCURACY_POINTS if self.quality == "eval_accuracy" else NEAR_BEST_LOSS_SHARE * abs(best)
        return [r for r in rows if abs(r[self.quality] - best) <= margin + 1e-12]

    def cheapest_first(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """`rows` by cost: the cheapness column, then the trainable share, then the better quality."""
        rank = {r["variant"]: i for i, r in enumerate(self.ranked(rows, self.quality))}
        return sorted(rows, key=lambda r: (_or_inf(r.get(self.cheapness)), _or_inf(r.get("trainable_percent")),
                                           rank[r["variant"]]))

    def recommend(self) -> Recommendation:
        """The variant to use: among the finished ones that fit, the cheapest within the near-best margin of the
        best mean (so with a tie, the cheapest of the tied group, unless a tied one is too noisy to be near).
        Rows of different stages are never ranked together: recommend within each of `per_stage()`."""
        if self.mixed_stages:
            raise ValueError(f"the rows train different stages ({', '.join(self.qualities)}): recommend "
                             "within each of Table.per_stage()")
        scored = self.scored(self.quality)
        unfit = [r["variant"] for r in scored if r.get("fits") is False]
        # projected to a target, a variant counts only when its projection says it fits; a variant with no
        # projection (a method that cannot apply to the target model) is not one to recommend for it
        unknown = [r["variant"] for r in scored if self.projected and r.get("fits") is None]
        candidates = [r for r in scored if r["variant"] not in unfit + unknown]
        if not candidates:
            return Recommendation(None, [], None, [], unfit, unknown, self.cheapness)
        ranked = self.ranked(candidates, self.quality)
        leaders = self.leaders(among=candidates)
        near = self.cheapest_first(self.near_best(candidates, ranked[0][self.quality]))
        runner_up = next((r["variant"] for r in ranked if r["variant"] not in leaders), None)
        return Recommendation(near[0]["variant"], leaders, runner_up, [r["variant"] for r in near], unfit, unknown,
                              self.cheapness)

    def cost_column(self, cost: str) -> str:
        """The column a cost axis reads: the projected peak on the target model when there is one, else the
        measured peak memory when every finished variant has one, else the estimate; wall time for "time"."""
        if cost not in COST_AXES:
            raise ValueError(f"cost must be one of {', '.join(COST_AXES)} (got {cost!r})")
        if cost == "time":
            return "wall_time_s"
        if self.projected:
            return "projected_peak_bytes"
        finished = [r for r in self.rows if r["state"] == "finished"]
        if finished and all(r.get("measured_peak_bytes") is not None for r in finished):
            return "measured_peak_bytes"
        return "estimated_peak_bytes"

    def pareto(self, cost: str = "memory") -> dict[str, bool]:
        """Which finished variants are non-dominated for `cost` ("memory" or "time") versus eval quality (each
        stage's among themselves where stages differ)."""
        if self.mixed_stages:
            return {name: on for part in self.per_stage().values() for name, on in part.pareto(cost).items()}
        column = self.cost_column(cost)
        rows = [r for r in self.scored(self.quality) if r.get(column) is not None]
        front = pareto_front([r[column] for r in rows], [r[self.quality] for r in rows],
                             higher_is_better=self.higher_is_better)
        return {r["variant"]: on for r, on in zip(rows, front, strict=True)}


def aggregate(seed_rows: Sequence[Mapping[str, Any]], quality: str,
              averaged: Sequence[str] = AVERAGED) -> dict[str, Any]:
    """One variant's row from its seeds' rows: when every seed finished, the `averaged` columns averaged over
    the seeds and the quality's sample std (`quality_std`, None with one seed); else the row of the first seed
    that did not finish."""
    unfinished = next((r for r in seed_rows if r["state"] != "finished"), None)
    row = dict(unfinished or seed_rows[0])
    if unfinished is None:
        for column in averaged:
            values = [r[column] for r in seed_rows if r.get(column) is not None]
            if column in row:
                row[column] = statistics.fmean(values) if values else None
    values = [r[quality] for r in seed_rows if r.get(quality) is not None]
    row["quality_std"] = statistics.stdev(values) if unfinished is None and len(values) > 1 else None
    row["seeds"] = len(seed_rows)
    row["served_from_store"] = all(r["served_from_store"] for r in seed_rows)
    row["run_ids"] = [r["run_id"] for r in seed_rows]
    return row


def stage_quality(task_name: str, stage: Stage) -> str:
    """The column a stage's variants are judged by: eval accuracy for classification, and for a stage whose
    loss is no token cross-entropy (its eval accuracy measures `stage.accuracy_means`); else the eval loss."""
    accuracy = task(task_name).metric is not None or not stage.language_model_loss
    return "eval_accuracy" if accuracy else "final_eval_loss"


def stage_metrics(stage_names: Iterable[str]) -> list[str]:
    """The metric columns the stages log beyond the loss (their `Stage.logged` names), in stage order."""
    names = [name for name in stage_names if name in STAGES]
    return list(dict.fromkeys(m for name in names for m in STAGES[name].logged.values()))


def final_metrics(run: Run | None, metrics: Sequence[str]) -> dict[str, float | None]:
    """Each metric's final value in a run: from its last evaluation after training started (held out), else
    its last logged step; None where the run never logged it (a run of another stage)."""
    evals = [e for e in events_of(run, "eval") if e.get("step")]  # step 0 is the untuned model
    steps = events_of(run, "step")

    def last(name: str, events: Sequence[Mapping[str, Any]]) -> float | None:
        return next((e[name] for e in reversed(events) if e.get(name) is not None), None)

    return {m: v if (v := last(m, evals)) is not None else last(m, steps) for m in metrics}


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

    def projections(self, configs: Mapping[str, TuneConfig], target_model: str, gpu: str) -> dict[str, Any]:
        """Each config's projection to the target, kept here too: those not kept yet are projected together
        (one import of the estimator), the rest are read back without torch."""
        from nbtune import __version__

        keys = {name: f"projection:{__version__}:{target_model}:{gpu}:{c.content_hash}" for name, c in configs.items()}
        cache = self._read()
        missing = {name: configs[name] for name, key in keys.items() if key not in cache}
        if missing:
            for name, projection in _project_all(missing, target_model, gpu).items():
                cache[keys[name]] = {**projection.to_dict(), "config": None}  # the config is the variant's own
            self._write()
        return {name: _stored_projection(cache[key]) for name, key in keys.items() if key in cache}

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


def _stored_projection(data: dict[str, Any]) -> Any:
    from nbtune.projection import Projection

    return Projection(**data)


def _project_all(configs: Mapping[str, TuneConfig], target_model: str, gpu: str) -> dict[str, Any]:
    """Every config's projection to the target (nbtune.projection, imported only when asked); empty when that
    module is not installed, so each row says "no projection"."""
    try:
        from nbtune.projection import project_all
    except ModuleNotFoundError as err:
        if err.name != "nbtune.projection":
            raise
        return {}
    return project_all(configs, target_model, gpu)


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


def unique_names(names: list[str]) -> list[str]:
    """The names made distinct by a numbered suffix on repeats (lora, lora-2), as a comparison names its runs."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out
