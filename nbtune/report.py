"""The report of a comparison: its charts (plain plotly figures), the fairness statement, the table as HTML and
a self-contained HTML page.

Everything here draws what `nbtune.comparison` computes (a `Table` of rows, computed once per render, the loss
curves, the memory breakdowns and the runs' summaries); nothing here trains, estimates or measures. plotly is
imported only when a chart is drawn.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nbtune.units import format_bytes

if TYPE_CHECKING:
    from nbtune.comparison import Comparison, Table
    from nbtune.config import TuneConfig
    from nbtune.records import RunSummary

# A variant's loss curve: its step events and its eval events that carry a loss (event data dicts), oldest first.
Curve = tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]

FAILED_STYLE = "color: #b00020; font-weight: 600"
LOSS_X = {"step": "step", "epoch": "epoch", "tokens": "tokens_seen"}  # the x axis -> the event field it reads
# The table's columns as the HTML shows them, in this order; columns not here (run_id, error, ...) are left out.
COLUMN_TITLES = {
    "variant": "variant", "method": "method", "state": "state", "learning_rate": "learning rate",
    "trainable_params": "trainable params", "trainable_percent": "trainable %",
    "estimated_peak_bytes": "est. peak memory", "measured_peak_bytes": "measured peak",
    "wall_time_s": "wall time", "tokens_per_s": "tokens/s", "final_train_loss": "final train loss",
    "best_train_loss": "best train loss", "final_eval_loss": "final eval loss", "best_eval_loss": "best eval loss",
    "eval_accuracy": "eval accuracy", "base_eval_accuracy": "base accuracy", "eval_perplexity": "eval perplexity",
    "artifact_bytes": "artifact size", "served_from_store": "from store",
}
COST_TITLES = {"estimated_peak_bytes": "estimated peak memory", "measured_peak_bytes": "measured peak memory",
               "wall_time_s": "wall time"}
PAGE_STYLE = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table.nbtune-comparison { border-collapse: collapse; font-size: 13px; }
table.nbtune-comparison th, table.nbtune-comparison td { border-bottom: 1px solid #ddd; padding: 4px 8px;
  text-align: right; white-space: nowrap; }
table.nbtune-comparison th { background: #f4f4f4; }
table.nbtune-comparison td:first-child, table.nbtune-comparison td:nth-child(2) { text-align: left; }"""


# ----- charts -----------------------------------------------------------------------------------------------
def loss_chart(curves: Mapping[str, Curve], labels: Mapping[str, str], x: str = "step", log_y: bool = True,
               smoothing: float = 0.6, show_eval: bool = True) -> Any:
    """Training loss curves overlaid, smoothed by an exponential moving average (0 = raw), with eval loss as
    dashed lines; `labels` names each variant's legend entry."""
    import plotly.graph_objects as go

    if x not in LOSS_X:
        raise ValueError(f"x must be one of {', '.join(LOSS_X)} (got {x!r})")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be >= 0 and < 1 (got {smoothing!r})")
    fig = go.Figure()
    colors = _palette()
    for i, (name, (steps, evals)) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        fig.add_trace(go.Scatter(x=[e.get(LOSS_X[x]) for e in steps], y=_ema([e["loss"] for e in steps], smoothing),
                                 mode="lines", name=labels.get(name, name), legendgroup=name, line={"color": color}))
        if show_eval:
            fig.add_trace(go.Scatter(x=_eval_xs(evals, steps, x), y=[e["loss"] for e in evals],
                                     mode="lines+markers", name=f"{name} (eval)", legendgroup=name,
                                     showlegend=False, line={"color": color, "dash": "dash"}, marker={"size": 5}))
    fig.update_layout(title=f"Loss by {x} (train solid, smoothing {smoothing}; eval dashed)",
                      xaxis_title={"step": "step", "epoch": "epoch", "tokens": "tokens seen"}[x],
                      yaxis_title="loss", yaxis_type="log" if log_y else "linear",
                      template="plotly_white", height=450)
    return fig


def _eval_xs(evals: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], x: str) -> list[Any]:
    if x != "tokens":
        return [e.get(LOSS_X[x]) for e in evals]
    # eval events carry the step; map it to the tokens seen at that step
    seen = {e.get("step"): e.get("tokens_seen") for e in steps}
    seen[0] = 0
    return [seen.get(e.get("step")) for e in evals]


def memory_chart(breakdowns: Mapping[str, Mapping[str, int]], labels: Mapping[str, str]) -> Any:
    """Each variant's estimated peak memory as a stacked bar of the estimator's categories (`breakdowns` maps a
    variant to {category: bytes}; empty when the estimator could not tell)."""
    import plotly.graph_objects as go

    names = list(breakdowns)
    categories = list(dict.fromkeys(c for b in breakdowns.values() for c in b))
    shown = [labels.get(n, n) for n in names]
    fig = go.Figure()
    for category in categories:
        fig.add_trace(go.Bar(x=shown, y=[breakdowns[n].get(category, 0) / 2**20 for n in names], name=category))
    title = "Estimated peak memory by category (MiB)"
    if not categories:
        title += ": no estimate available"
    fig.update_layout(barmode="stack", title=title, yaxis_title="GPU MiB", template="plotly_white", height=450,
                      legend={"traceorder": "reversed"})
    return fig


def pareto_chart(table: Table, cost: str = "memory") -> Any:
    """Eval quality against peak memory or wall time; the non-dominated variants are marked and joined."""
    import plotly.graph_objects as go

    column = table.cost_column(cost)
    front = table.pareto(cost)
    rows = table.by_variant()
    scale = 2**20 if column.endswith("_bytes") else 1

    def point(name: str) -> tuple[float, Any]:
        return rows[name][column] / scale, rows[name][table.quality]

    fig = go.Figure()
    for on, label, symbol in ((True, "Pareto front (non-dominated)", "star"), (False, "dominated", "circle")):
        names = [n for n, flag in front.items() if flag is on]
        fig.add_trace(go.Scatter(
            x=[point(n)[0] for n in names], y=[point(n)[1] for n in names],
            text=names, mode="markers+text", textposition="top center", name=label,
            marker={"symbol": symbol, "size": 14 if on else 9, "color": "#d62728" if on else "#7f7f7f"}))
    line = sorted(point(n) for n, flag in front.items() if flag)
    if len(line) > 1:
        fig.add_trace(go.Scatter(x=[p[0] for p in line], y=[p[1] for p in line], mode="lines",
                                 line={"color": "#d62728", "dash": "dot"}, showlegend=False, hoverinfo="skip"))
    what = COST_TITLES[column]
    better = "higher is better" if table.higher_is_better else "lower is better"
    fig.update_layout(title=f"{table.quality} ({better}) vs {what}",
                      xaxis_title=f"{what} ({'MiB' if scale > 1 else 's'})",
                      yaxis_title=table.quality, template="plotly_white", height=450)
    failures = table.failures()
    if failures:  # a failed variant has no point to plot: say so on the chart rather than leave it out silently
        labels = table.labels()
        fig.add_annotation(text="not shown: " + ", ".join(labels[n] for n in failures),
                           xref="paper", yref="paper", x=0, y=1.06, showarrow=False,
                           font={"color": "#b00020"}, xanchor="left")
    return fig


def figures(curves: Mapping[str, Curve], breakdowns: Mapping[str, Mapping[str, int]], table: Table,
            x: str = "step", log_y: bool = True, smoothing: float = 0.6, cost: str = "memory") -> dict[str, Any]:
    """Every chart of a comparison, labelled from one table: loss curves, memory breakdown and Pareto chart."""
    labels = table.labels()
    return {"loss": loss_chart(curves, labels, x=x, log_y=log_y, smoothing=smoothing),
            "memory": memory_chart(breakdowns, labels), "pareto": pareto_chart(table, cost)}


def _ema(values: list[float], smoothing: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else smoothing * last + (1 - smoothing) * v
        out.append(last)
    return out


def _palette() -> list[str]:
    import plotly.express as px

    return px.colors.qualitative.Plotly + px.colors.qualitative.D3


# ----- fairness ---------------------------------------------------------------------------------------------
def fairness(configs: Mapping[str, TuneConfig], summaries: Sequence[RunSummary]) -> list[str]:
    """What every variant shared (seed, data order, eval set, token budget) and what differed, as sentences;
    `summaries` are those of the variants that have run."""
    if not configs:
        return ["No variants."]
    first = next(iter(configs.values()))
    data = next((s.data for s in summaries if s.data), {})
    lines = [f"Same base model for every variant: {first.model.name_or_path} (task {first.model.task}).",
             _data_sentence(first, summaries, data), _eval_sentence(first, data), _budget_sentence(first, summaries)]
    lines += _learning_rate_sentences(configs)
    devices = {s.device for s in summaries if s.device}
    lines.append(f"Trained one after another on one device ({', '.join(sorted(devices)) or 'not run yet'}).")
    if devices and "cuda" not in devices:
        lines.append("Peak memory is the GPU estimate of nbtune.estimate_memory: a CPU run has no GPU peak to "
                     "measure.")
    differs = _differences(configs)
    if differs:
        lines.append("Not the same across variants: " + "; ".join(differs) + ".")
    return lines


def _data_sentence(first: TuneConfig, summaries: Sequence[RunSummary], data: Mapping[str, Any]) -> str:
    fingerprint = {s.data.get("fingerprint") for s in summaries if s.data}
    return (f"Same data and data order: {source_text(first)}"
            + (f", fingerprint {', '.join(sorted(fingerprint))}" if fingerprint else "")
            + (f", {data.get('train_rows')} train rows" if data else "")
            + f", shuffled with seed {first.training.seed}.")


def _eval_sentence(first: TuneConfig, data: Mapping[str, Any]) -> str:
    t = first.training
    when = f"every {t.eval_every} steps and at the end" if t.eval_every else "at the end"
    return (f"Same eval set: {data.get('eval_rows', 'the')} held-out rows ({first.data.eval_split!r} split), "
            f"evaluated {when}.")


def _budget_sentence(first: TuneConfig, summaries: Sequence[RunSummary]) -> str:
    t = first.training
    batch = t.micro_batch_size * t.gradient_accumulation_steps
    budget = f"{t.max_steps} steps × {batch} examples = {t.max_steps * batch} examples" if t.max_steps \
        else f"{t.epochs} epochs"
    tokens = sorted({s.tokens_seen for s in summaries if s.tokens_seen is not None})
    if tokens:
        budget += f", {tokens[0]} tokens seen" if len(tokens) == 1 else f", {tokens[0]}–{tokens[-1]} tokens seen"
    return f"Same token budget: {budget}; same seed ({t.seed}) for initialisation and dropout."


def _learning_rate_sentences(configs: Mapping[str, TuneConfig]) -> list[str]:
    rates = {c.training.learning_rate for c in configs.values()}
    if rates == {None}:
        return ["Learning rate: each method's registry default (prompt methods need larger ones), shown in the table."]
    if len(rates) == 1:
        return [f"Learning rate: {next(iter(rates))} for every variant."]
    return []


def _differences(configs: Mapping[str, TuneConfig]) -> list[str]:
    """The model, data and training fields (except the learning rate) whose values differ across variants."""
    flat = {}
    for name, config in configs.items():
        d = config.to_dict()
        d["training"].pop("learning_rate", None)
        flat[name] = {f"{section}.{k}": json.dumps(v, sort_keys=True, default=str)
                      for section in ("model", "data", "training") for k, v in d[section].items()}
    out = []
    for key in next(iter(flat.values())):
        values = {name: f[key] for name, f in flat.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{n}: {v[:40]}" for n, v in list(values.items())[:4])
            out.append(f"{key} ({shown})")
    return out


def source_text(config: TuneConfig) -> str:
    """The data source as a sentence shows it: its name, or how many in-memory rows."""
    source = config.data.source
    return source if isinstance(source, str) else f"{len(source)} in-memory rows"


# ----- HTML -------------------------------------------------------------------------------------------------
def table_html(table: Table) -> str:
    """The table as an HTML fragment, numbers formatted for reading; ★ marks the memory Pareto front."""
    columns = [c for c in COLUMN_TITLES if any(c in r for r in table.rows)]
    front = table.pareto("memory") if table.rows else {}
    failures = table.failures()
    head = "".join(f"<th>{html.escape(COLUMN_TITLES[c])}</th>" for c in columns)
    body = []
    for r in table.rows:
        mark = " ★" if front.get(r["variant"]) else ""
        cells = "".join(_cell_html(c, r, failures) + (mark if c == "variant" else "") + "</td>" for c in columns)
        title = f' title="{html.escape(r["error"])}"' if r.get("error") else ""
        failed = ' class="nbtune-failed"' if r["variant"] in failures else ""
        body.append(f"<tr{failed}{title}>{cells}</tr>")
    return (f'<table class="nbtune-comparison"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>"
            "<p><small>★ non-dominated: no other variant is both cheaper in peak memory and better in "
            f"{html.escape(table.quality)}.</small></p>")


def _cell_html(column: str, row: Mapping[str, Any], failures: Mapping[str, str]) -> str:
    """A table cell (left open for a mark): a failed variant's state cell shows the reason, in red."""
    reason = failures.get(row["variant"])
    if column != "state" or reason is None:
        return f"<td>{html.escape(format_value(column, row.get(column)))}"
    short = reason if len(reason) <= 90 else reason[:89] + "…"
    return f'<td style="{FAILED_STYLE}">{html.escape(row["state"])}: {html.escape(short)}'


_FORMATS = {"trainable_params": lambda v: f"{int(v):,}", "trainable_percent": "{:.2f}%".format,
            "wall_time_s": "{:.1f} s".format, "tokens_per_s": "{:,.0f}".format, "learning_rate": "{:g}".format}


def format_value(column: str, value: Any) -> str:
    """A table value as the HTML shows it (bytes in KiB/MiB/GiB, percentages, seconds ...; – when unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_bytes"):
        return format_bytes(value)
    if column in _FORMATS:
        return _FORMATS[column](value)
    if isinstance(value, float):
        return f"{value:.4f}" if "loss" in column or "accuracy" in column else f"{value:.3g}"
    return str(value)


def _failures_html(table: Table, variants: int) -> str:
    failures = table.failures()
    if not failures:
        return ""
    states = {r["variant"]: r["state"] for r in table.rows}
    items = "".join(f"<li><b>{html.escape(name)}</b> {html.escape(states[name])}: {html.escape(reason)}</li>"
                    for name, reason in failures.items())
    return (f'<h2 style="{FAILED_STYLE}">Failed: {len(failures)} of {variants} variants</h2>'
            f"<ul class='nbtune-failures'>{items}</ul>")


def _fairness_html(lines: Sequence[str]) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<ul class='nbtune-fairness'>{items}</ul>"


def notebook_html(fairness_lines: Sequence[str], table: Table) -> str:
    """What a notebook shows for a comparison: the fairness statement and the table (static HTML)."""
    return f"<div><b>nbtune comparison</b>{_fairness_html(fairness_lines)}{table_html(table)}</div>"


def page_html(comparison: Comparison, table: Table, title: str = "nbtune: which method?") -> str:
    """A self-contained HTML page (plotly.js inlined, works offline): failures, fairness, table and charts."""
    import plotly.io as pio

    from nbtune import __version__

    drawn = figures(comparison.loss_curves(), comparison.memory_breakdowns(), table)
    charts = [pio.to_html(fig, full_html=False, include_plotlyjs=i == 0, default_width="100%")
              for i, fig in enumerate(drawn.values())]
    base = comparison.base_config
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
{PAGE_STYLE}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(comparison.runs)} variants of {html.escape(base.model.name_or_path)} on
{html.escape(source_text(base))} ({html.escape(base.model.task)}). Store: {html.escape(str(comparison.store.root))}.
Generated {time.strftime("%Y-%m-%d %H:%M:%S")} by nbtune {__version__}.</p>
{_failures_html(table, len(comparison.runs))}
<h2>Fairness</h2>{_fairness_html(comparison.fairness())}
<h2>Table</h2>{table_html(table)}
<h2>Charts</h2>
{"".join(f'<div class="nbtune-chart">{c}</div>' for c in charts)}
</body></html>
"""
