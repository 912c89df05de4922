"""Compare tuning methods side by side on the same model, data and budget, from cached runs.

`compare(base_config, methods=[...])` trains every variant one after another (finished ones are served from the
store), and returns a `Comparison`: a table (one row per variant), charts (plain plotly figures: loss curves,
memory breakdown, Pareto front) and a self-contained HTML report. A comparison re-opens from the store alone,
without training or loading a model, and grows when a variant is added: only the new one trains.
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nbtune.config import TuneConfig
from nbtune.runner import Run, open_run
from nbtune.store import RunRecord, RunStore, cache_key, write_atomic
from nbtune.units import format_bytes

VariantSpec = TuneConfig | Mapping[str, Any] | str

# Columns where a larger value is better; every other numeric column is better when smaller.
HIGHER_IS_BETTER = ("eval_accuracy", "base_eval_accuracy", "tokens_per_s")
ESTIMATES_FILE = "estimates.json"  # memory estimates of compared configs, in the store root
COST_AXES = {"memory": "peak memory (bytes)", "time": "wall time (s)"}
# Run states that mean a variant produced no result, with the reason shown when the run recorded none.
FAILED_STATES = {"failed": "failed without a recorded reason",
                 "interrupted": "the process that trained it ended before the run did"}
FAILED_STYLE = "color: #b00020; font-weight: 600"


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
        self._estimates: dict[str, Any] | None = None

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
        from nbtune.runner import launch

        specs = _variant_specs(self.base_config, methods, variants) if methods or variants else {}
        todo = {name: variant_config(self.base_config, spec) for name, spec in specs.items()}
        for index, (name, config) in enumerate(todo.items(), 1):
            self.configs[name] = config
            prefix = f"[{index}/{len(todo)}] {name}"
            if not train:
                record = self.store.find_finished(cache_key(config)["key"])
                self.runs[name] = open_run(record) if record is not None else None
                if record is not None:
                    self.served_from_store.add(name)
                continue
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
            if progress:
                how = "served from the store" if run.cached else f"trained in {time.perf_counter() - started:.0f}s"
                metric = self._metric_text(name)
                print(f"{prefix}: {run.status}, {how}{metric}", flush=True)
        return self

    # ----- the table -----------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.base_config.model.task

    @property
    def metric(self) -> str:
        """The task metric column: eval_accuracy for classification, eval_perplexity for language modelling."""
        return "eval_accuracy" if self.task == "seq-cls" else "eval_perplexity"

    @property
    def quality(self) -> str:
        """The eval-quality column used by `best()` and the Pareto chart (higher accuracy, or lower eval loss)."""
        return "eval_accuracy" if self.task == "seq-cls" else "final_eval_loss"

    def _state(self, name: str) -> str:
        run = self.runs.get(name)
        return "missing" if run is None else run.status

    def _metric_text(self, name: str) -> str:
        summary = (self.runs[name] or _NoRun).summary or {}
        if summary.get("error"):
            return f" ({summary['error']})"
        value = summary.get("final_eval_accuracy" if self.task == "seq-cls" else "final_perplexity")
        if value is None:
            return ""
        return f", eval accuracy {value:.3f}" if self.task == "seq-cls" else f", eval perplexity {value:.2f}"

    def failures(self) -> dict[str, str]:
        """The variants whose run failed or was interrupted, each with its reason (empty when none did)."""
        out = {}
        for name, run in self.runs.items():
            if run is not None and run.status in FAILED_STATES:
                out[name] = run.error or FAILED_STATES[run.status]
        return out

    def _label(self, name: str, failures: Mapping[str, str]) -> str:
        """A variant's name as charts show it: failed ones say so."""
        return f"{name} ({self.runs[name].status})" if name in failures else name  # type: ignore[union-attr]

    def estimate(self, name: str) -> dict[str, Any] | None:
        """A variant's memory estimate as {"total_bytes", "breakdown": [[category, bytes], ...]}, or None when
        the estimator cannot tell.

        Estimates are kept in the store (`estimates.json`), so a comparison re-opened later imports no torch.
        """
        from nbtune import __version__

        config = self.configs[name]
        key = f"{__version__}:{config.content_hash}:{config.model.name_or_path}"
        cache = self._estimate_cache()
        if key not in cache:
            try:
                from nbtune.estimator import estimate_memory

                estimate = estimate_memory(config)
                labels = getattr(sys.modules.get(type(estimate).__module__), "LABELS", {})
                cache[key] = {"total_bytes": int(estimate.total_bytes),  # breakdown in the estimator's order
                              "breakdown": [[labels.get(k, k), int(v)] for k, v in estimate.breakdown.items()]}
            except Exception:  # the estimate is informative; the comparison never fails for it
                cache[key] = None
            self._save_estimates()
        return cache[key]

    def _estimate_cache(self) -> dict[str, Any]:
        if self._estimates is None:
            try:
                self._estimates = json.loads((self.store.root / ESTIMATES_FILE).read_text())
            except (OSError, ValueError):
                self._estimates = {}
        return self._estimates

    def _save_estimates(self) -> None:
        try:
            self.store.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.store.root / ESTIMATES_FILE, json.dumps(self._estimates))
        except OSError:  # a read-only store still compares; estimates are recomputed next time
            pass

    def rows(self) -> list[dict[str, Any]]:
        """One dict per variant, the raw numbers of the table."""
        out = []
        for name, config in self.configs.items():
            run = self.runs.get(name)
            summary = (run.summary if run is not None else None) or {}
            steps = _events(run, "step")
            train_losses = [e["loss"] for e in steps if e.get("loss") is not None]
            estimated = summary.get("estimated_peak_bytes")
            if estimated is None:
                estimated = (self.estimate(name) or {}).get("total_bytes")
            row = {
                "variant": name,
                "method": config.method.name,
                "state": self._state(name),
                "served_from_store": name in self.served_from_store,
                "learning_rate": summary.get("learning_rate", config.learning_rate),
                "trainable_params": summary.get("trainable_params"),
                "total_params": summary.get("total_params"),
                "trainable_percent": summary.get("trainable_percent"),
                "estimated_peak_bytes": estimated,
                "measured_peak_bytes": summary.get("measured_peak_bytes"),
                "wall_time_s": summary.get("wall_time_s"),
                "tokens_per_s": summary.get("tokens_per_s"),
                "tokens_seen": summary.get("tokens_seen"),
                "steps": summary.get("step"),
                "final_train_loss": summary.get("final_train_loss"),
                "best_train_loss": min(train_losses) if train_losses else None,
                "final_eval_loss": summary.get("final_eval_loss"),
                "best_eval_loss": summary.get("best_eval_loss"),
            }
            if self.task == "seq-cls":
                row["eval_accuracy"] = summary.get("final_eval_accuracy")
                row["base_eval_accuracy"] = summary.get("base_eval_accuracy")
            else:
                row["eval_perplexity"] = summary.get("final_perplexity")
            row["artifact_bytes"] = summary.get("artifact_bytes")
            row["error"] = summary.get("error")
            row["run_id"] = run.id if run is not None else None
            out.append(row)
        return out

    def to_pandas(self) -> Any:
        """The comparison table as a pandas DataFrame, one row per variant (indexed by variant name)."""
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("variant")

    def best(self, by: str | None = None) -> Run:
        """The finished run that is best by a table column (default: the task's eval quality; ties go to the
        lower eval loss)."""
        by = by or self.quality
        rows = [r for r in self.rows() if r["state"] == "finished" and r.get(by) is not None]
        if not rows:
            raise ValueError(f"no finished variant has a value for {by!r}; columns: {', '.join(self.rows()[0])}")
        sign = 1 if by in HIGHER_IS_BETTER else -1
        winner = max(rows, key=lambda r: (sign * r[by], -_or_inf(r["final_eval_loss"])))
        return self.runs[winner["variant"]]  # type: ignore[return-value]

    def pareto(self, cost: str = "memory") -> dict[str, bool]:
        """Which finished variants are non-dominated for `cost` ("memory" or "time") versus eval quality."""
        column = self._cost_column(cost)
        rows = [r for r in self.rows() if r["state"] == "finished" and r.get(column) is not None
                and r.get(self.quality) is not None]
        front = pareto_front([r[column] for r in rows], [r[self.quality] for r in rows],
                             higher_is_better=self.quality in HIGHER_IS_BETTER)
        return {r["variant"]: on for r, on in zip(rows, front, strict=True)}

    def _cost_column(self, cost: str) -> str:
        if cost not in COST_AXES:
            raise ValueError(f"cost must be one of {', '.join(COST_AXES)} (got {cost!r})")
        if cost == "time":
            return "wall_time_s"
        rows = [r for r in self.rows() if r["state"] == "finished"]
        if rows and all(r["measured_peak_bytes"] is not None for r in rows):
            return "measured_peak_bytes"
        return "estimated_peak_bytes"

    # ----- fairness -------------------------------------------------------------------------------------------
    def fairness(self) -> list[str]:
        """What every variant shared (seed, data order, eval set, token budget) and what differed, as sentences."""
        configs = self.configs
        if not configs:
            return ["No variants."]
        first = next(iter(configs.values()))
        summaries = [(self.runs.get(n) or _NoRun).summary or {} for n in configs]
        t = first.training
        lines = []
        differs = _differences(configs)
        data = next((s.get("data") for s in summaries if s.get("data")), None) or {}
        source = first.data.source if isinstance(first.data.source, str) else f"{len(first.data.source)} in-memory rows"
        lines.append(f"Same base model for every variant: {first.model.name_or_path} (task {first.model.task}).")
        fingerprint = {(s.get("data") or {}).get("fingerprint") for s in summaries if s.get("data")}
        lines.append(f"Same data and data order: {source}"
                     + (f", fingerprint {', '.join(sorted(fingerprint))}" if fingerprint else "")
                     + (f", {data.get('train_rows')} train rows" if data else "")
                     + f", shuffled with seed {t.seed}.")
        eval_rows = data.get("eval_rows", "the")
        when = f"every {t.eval_every} steps and at the end" if t.eval_every else "at the end"
        lines.append(f"Same eval set: {eval_rows} held-out rows ({first.data.eval_split!r} split), evaluated {when}.")
        examples = (t.max_steps or 0) * t.micro_batch_size * t.gradient_accumulation_steps
        budget = (f"{t.max_steps} steps × {t.micro_batch_size * t.gradient_accumulation_steps} examples = "
                  f"{examples} examples" if t.max_steps else f"{t.epochs} epochs")
        tokens = sorted({s["tokens_seen"] for s in summaries if s.get("tokens_seen") is not None})
        if tokens:
            budget += (f", {tokens[0]} tokens seen" if len(tokens) == 1
                       else f", {tokens[0]}–{tokens[-1]} tokens seen")
        lines.append(f"Same token budget: {budget}; same seed ({t.seed}) for initialisation and dropout.")
        rates = {n: c.training.learning_rate for n, c in configs.items()}
        if all(r is None for r in rates.values()):
            lines.append("Learning rate: each method's registry default (prompt methods need larger ones), "
                         "shown in the table.")
        elif len({*rates.values()}) == 1:
            lines.append(f"Learning rate: {next(iter(rates.values()))} for every variant.")
        devices = {s.get("device") for s in summaries if s.get("device")}
        lines.append(f"Trained one after another on one device ({', '.join(sorted(devices)) or 'not run yet'}).")
        if devices and "cuda" not in devices:
            lines.append("Peak memory is the GPU estimate of nbtune.estimate_memory: a CPU run has no GPU peak to "
                         "measure.")
        if differs:
            lines.append("Not the same across variants: " + "; ".join(differs) + ".")
        return lines

    # ----- charts ---------------------------------------------------------------------------------------------
    def loss_chart(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6, show_eval: bool = True) -> Any:
        """Training loss curves overlaid (x: "step", "epoch" or "tokens"), smoothed by an exponential moving
        average (0 = raw), with eval loss as dashed lines."""
        import plotly.graph_objects as go

        keys = {"step": "step", "epoch": "epoch", "tokens": "tokens_seen"}
        if x not in keys:
            raise ValueError(f"x must be one of {', '.join(keys)} (got {x!r})")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be >= 0 and < 1 (got {smoothing!r})")
        fig = go.Figure()
        colors = _palette()
        failures = self.failures()
        for i, (name, run) in enumerate(self.runs.items()):
            color = colors[i % len(colors)]
            steps = [e for e in _events(run, "step") if e.get("loss") is not None]
            xs = [e.get(keys[x]) for e in steps]
            fig.add_trace(go.Scatter(x=xs, y=_ema([e["loss"] for e in steps], smoothing), mode="lines",
                                     name=self._label(name, failures), legendgroup=name, line={"color": color}))
            if show_eval:
                evals = [e for e in _events(run, "eval") if e.get("loss") is not None]
                if x == "tokens":  # eval events carry the step; map it to the tokens seen at that step
                    seen = {e.get("step"): e.get("tokens_seen") for e in steps}
                    seen[0] = 0
                    ex = [seen.get(e.get("step")) for e in evals]
                else:
                    ex = [e.get(keys[x]) for e in evals]
                fig.add_trace(go.Scatter(x=ex, y=[e["loss"] for e in evals], mode="lines+markers",
                                         name=f"{name} (eval)", legendgroup=name, showlegend=False,
                                         line={"color": color, "dash": "dash"}, marker={"size": 5}))
        fig.update_layout(title=f"Loss by {x} (train solid, smoothing {smoothing}; eval dashed)",
                          xaxis_title={"step": "step", "epoch": "epoch", "tokens": "tokens seen"}[x],
                          yaxis_title="loss", yaxis_type="log" if log_y else "linear",
                          template="plotly_white", height=450)
        return fig

    def memory_chart(self) -> Any:
        """The estimated peak memory of each variant as a stacked bar of the estimator's categories."""
        import plotly.graph_objects as go

        names = list(self.configs)
        breakdowns = {n: dict((self.estimate(n) or {}).get("breakdown") or []) for n in names}
        categories = list(dict.fromkeys(c for b in breakdowns.values() for c in b))
        failures = self.failures()
        labels = [self._label(n, failures) for n in names]
        fig = go.Figure()
        for category in categories:
            fig.add_trace(go.Bar(x=labels, y=[breakdowns[n].get(category, 0) / 2**20 for n in names], name=category))
        title = "Estimated peak memory by category (MiB)"
        if not categories:
            title += ": no estimate available"
        fig.update_layout(barmode="stack", title=title, yaxis_title="GPU MiB", template="plotly_white", height=450,
                          legend={"traceorder": "reversed"})
        return fig

    def pareto_chart(self, cost: str = "memory") -> Any:
        """Eval quality against peak memory or wall time; the non-dominated variants are marked and joined."""
        import plotly.graph_objects as go

        column = self._cost_column(cost)
        front = self.pareto(cost)
        rows = {r["variant"]: r for r in self.rows()}
        scale = 2**20 if column.endswith("_bytes") else 1
        unit = "MiB" if scale > 1 else "s"
        fig = go.Figure()
        for on, label, symbol in ((True, "Pareto front (non-dominated)", "star"), (False, "dominated", "circle")):
            names = [n for n, flag in front.items() if flag is on]
            fig.add_trace(go.Scatter(
                x=[rows[n][column] / scale for n in names], y=[rows[n][self.quality] for n in names],
                text=names, mode="markers+text", textposition="top center", name=label,
                marker={"symbol": symbol, "size": 14 if on else 9, "color": "#d62728" if on else "#7f7f7f"}))
        line = sorted((rows[n][column] / scale, rows[n][self.quality]) for n, flag in front.items() if flag)
        if len(line) > 1:
            fig.add_trace(go.Scatter(x=[p[0] for p in line], y=[p[1] for p in line], mode="lines",
                                     line={"color": "#d62728", "dash": "dot"}, showlegend=False, hoverinfo="skip"))
        what = {"estimated_peak_bytes": "estimated peak memory", "measured_peak_bytes": "measured peak memory",
                "wall_time_s": "wall time"}[column]
        better = "higher is better" if self.quality in HIGHER_IS_BETTER else "lower is better"
        fig.update_layout(title=f"{self.quality} ({better}) vs {what}", xaxis_title=f"{what} ({unit})",
                          yaxis_title=self.quality, template="plotly_white", height=450)
        failures = self.failures()
        if failures:  # a failed variant has no point to plot: say so on the chart rather than leave it out silently
            fig.add_annotation(text="not shown: " + ", ".join(self._label(n, failures) for n in failures),
                               xref="paper", yref="paper", x=0, y=1.06, showarrow=False,
                               font={"color": "#b00020"}, xanchor="left")
        return fig

    def figures(self, x: str = "step", log_y: bool = True, smoothing: float = 0.6,
                cost: str = "memory") -> dict[str, Any]:
        """Every chart of the comparison: loss curves, memory breakdown and Pareto chart."""
        return {"loss": self.loss_chart(x=x, log_y=log_y, smoothing=smoothing),
                "memory": self.memory_chart(), "pareto": self.pareto_chart(cost)}

    # ----- display and report ---------------------------------------------------------------------------------
    def table_html(self) -> str:
        """The table as an HTML fragment, numbers formatted for reading (raw ones: `to_pandas()`)."""
        rows = self.rows()
        columns = [c for c in _DISPLAY if any(c in r for r in rows)]
        front = self.pareto("memory") if rows else {}
        failures = self.failures()
        head = "".join(f"<th>{html.escape(_DISPLAY[c])}</th>" for c in columns)
        body = []
        for r in rows:
            mark = " ★" if front.get(r["variant"]) else ""
            cells = "".join(self._cell_html(c, r, failures) + (mark if c == "variant" else "") + "</td>"
                            for c in columns)
            title = f' title="{html.escape(r["error"])}"' if r.get("error") else ""
            failed = ' class="nbtune-failed"' if r["variant"] in failures else ""
            body.append(f"<tr{failed}{title}>{cells}</tr>")
        return (f'<table class="nbtune-comparison"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>"
                "<p><small>★ non-dominated: no other variant is both cheaper in peak memory and better in "
                f"{html.escape(self.quality)}.</small></p>")

    @staticmethod
    def _cell_html(column: str, row: Mapping[str, Any], failures: Mapping[str, str]) -> str:
        """A table cell (left open for a mark): a failed variant's state cell shows the reason, in red."""
        reason = failures.get(row["variant"])
        if column != "state" or reason is None:
            return f"<td>{html.escape(_format(column, row.get(column)))}"
        short = reason if len(reason) <= 90 else reason[:89] + "…"
        return f'<td style="{FAILED_STYLE}">{html.escape(row["state"])}: {html.escape(short)}'

    def _failures_html(self) -> str:
        failures = self.failures()
        if not failures:
            return ""
        items = "".join(f"<li><b>{html.escape(name)}</b> {html.escape(self._state(name))}: {html.escape(reason)}</li>"
                        for name, reason in failures.items())
        return (f'<h2 style="{FAILED_STYLE}">Failed: {len(failures)} of {len(self.runs)} variants</h2>'
                f"<ul class='nbtune-failures'>{items}</ul>")

    def _fairness_html(self) -> str:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.fairness())
        return f"<ul class='nbtune-fairness'>{items}</ul>"

    def _repr_html_(self) -> str:
        return f"<div><b>nbtune comparison</b>{self._fairness_html()}{self.table_html()}</div>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.to_pandas().to_string(), "text/html": self._repr_html_()}

    def show(self, **chart_options: Any) -> None:
        """Display the table and every chart in a notebook (charts through plotly's renderer, which saves them
        as plotly JSON in Jupyter)."""
        from IPython.display import display

        display(self)
        for fig in self.figures(**chart_options).values():
            display(fig)

    def to_html(self, path: str | Path | None = None, title: str = "nbtune: which method?") -> str:
        """A self-contained HTML report (plotly.js inlined, works offline): fairness, table and charts.

        Written to `path` when given; the HTML is returned either way.
        """
        import plotly.io as pio

        from nbtune import __version__

        charts = []
        for i, fig in enumerate(self.figures().values()):
            charts.append(pio.to_html(fig, full_html=False, include_plotlyjs=i == 0, default_width="100%"))
        generated = time.strftime("%Y-%m-%d %H:%M:%S")
        page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
table.nbtune-comparison {{ border-collapse: collapse; font-size: 13px; }}
table.nbtune-comparison th, table.nbtune-comparison td {{ border-bottom: 1px solid #ddd; padding: 4px 8px;
  text-align: right; white-space: nowrap; }}
table.nbtune-comparison th {{ background: #f4f4f4; }}
table.nbtune-comparison td:first-child, table.nbtune-comparison td:nth-child(2) {{ text-align: left; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(self.runs)} variants of {html.escape(self.base_config.model.name_or_path)} on
{html.escape(_source_text(self.base_config))} ({html.escape(self.task)}). Store: {html.escape(str(self.store.root))}.
Generated {generated} by nbtune {__version__}.</p>
{self._failures_html()}
<h2>Fairness</h2>{self._fairness_html()}
<h2>Table</h2>{self.table_html()}
<h2>Charts</h2>
{"".join(f'<div class="nbtune-chart">{c}</div>' for c in charts)}
</body></html>
"""
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


def pareto_front(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[bool]:
    """For each point, whether it is non-dominated: no other point costs no more and is no worse in quality,
    and strictly better in one of the two."""
    sign = 1 if higher_is_better else -1
    points = [(c, sign * q) for c, q in zip(costs, qualities, strict=True)]
    return [not any(oc <= c and oq >= q and (oc < c or oq > q) for oc, oq in points) for c, q in points]


class _NoRun:
    summary: dict[str, Any] | None = None


_DISPLAY = {
    "variant": "variant", "method": "method", "state": "state", "learning_rate": "learning rate",
    "trainable_params": "trainable params", "trainable_percent": "trainable %",
    "estimated_peak_bytes": "est. peak memory", "measured_peak_bytes": "measured peak",
    "wall_time_s": "wall time", "tokens_per_s": "tokens/s", "final_train_loss": "final train loss",
    "best_train_loss": "best train loss", "final_eval_loss": "final eval loss", "best_eval_loss": "best eval loss",
    "eval_accuracy": "eval accuracy", "base_eval_accuracy": "base accuracy", "eval_perplexity": "eval perplexity",
    "artifact_bytes": "artifact size", "served_from_store": "from store",
}


def _format(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_bytes"):
        return format_bytes(value)
    if column == "trainable_params":
        return f"{int(value):,}"
    if column == "trainable_percent":
        return f"{value:.2f}%"
    if column == "wall_time_s":
        return f"{value:.1f} s"
    if column == "tokens_per_s":
        return f"{value:,.0f}"
    if column == "learning_rate":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.4f}" if "loss" in column or "accuracy" in column else f"{value:.3g}"
    return str(value)


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value



def _events(run: Run | None, kind: str) -> list[dict[str, Any]]:
    if run is None:
        return []
    return [e.data for e in list(run.events.history) if e.kind == kind]


def _ema(values: list[float], smoothing: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else smoothing * last + (1 - smoothing) * v
        out.append(last)
    return out


def _palette() -> list[str]:
    import plotly.express as px

    return px.colors.qualitative.Plotly + px.colors.qualitative.D3


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _source_text(config: TuneConfig) -> str:
    source = config.data.source
    return source if isinstance(source, str) else f"{len(source)} in-memory rows"


def _differences(configs: Mapping[str, TuneConfig]) -> list[str]:
    """The model, data and training fields (except the learning rate) whose values differ across variants."""
    flat = {}
    for name, config in configs.items():
        d = config.to_dict()
        d["training"].pop("learning_rate", None)
        flat[name] = {f"{section}.{k}": json.dumps(v, sort_keys=True, default=str)
                      for section in ("model", "data", "training") for k, v in d[section].items()}
    out = []
    keys = next(iter(flat.values())).keys()
    for key in keys:
        values = {name: f[key] for name, f in flat.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{n}: {v[:40]}" for n, v in list(values.items())[:4])
            out.append(f"{key} ({shown})")
    return out
