"""The report of a comparison: its charts (plain plotly figures), the recommendation and the fairness statement
in words, the table as HTML and a self-contained HTML page.

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

from nbtune.stages import STAGES, of_task
from nbtune.tasks import HELD_OUT_ACCURACY
from nbtune.units import format_bytes

if TYPE_CHECKING:
    from nbtune.comparison import Comparison, Recommendation, Table
    from nbtune.config import TuneConfig
    from nbtune.records import RunSummary

# A variant's loss curve: its step events and its eval events that carry a loss (event data dicts), oldest first.
Curve = tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]

FAILED_STYLE = "color: #b00020; font-weight: 600"
LOSS_X = {"step": "step", "epoch": "epoch", "tokens": "tokens_seen"}  # the x axis -> the event field it reads
# The table's columns as the HTML shows them, in this order; columns not here (run_id, error, ...) are left out.
COLUMN_TITLES = {
    "variant": "variant", "method": "method", "stage": "stage", "state": "state",
    "learning_rate": "learning rate",
    "trainable_params": "trainable params", "trainable_percent": "trainable %",
    "estimated_peak_bytes": "est. peak memory", "measured_peak_bytes": "measured peak",
    "wall_time_s": "wall time", "tokens_per_s": "tokens/s", "final_train_loss": "final train loss",
    "best_train_loss": "best train loss", "final_eval_loss": "final eval loss", "best_eval_loss": "best eval loss",
    "eval_accuracy": "eval accuracy", "base_eval_accuracy": "base accuracy", "eval_perplexity": "eval perplexity",
    "artifact_bytes": "artifact size", "served_from_store": "from store", "seeds": "seeds",
    "fits": "fits the GPU", "projected_peak_bytes": "projected peak", "projected_step_time_s": "projected step time",
    "projected_tokens_per_s": "projected tokens/s", "projection_error": "projection",
}
QUALITY_WORDS = {"eval_accuracy": "eval accuracy", "final_eval_loss": "eval loss"}
# The stages' metric columns (their `Stage.logged` names) in words; a metric not here shows its name.
METRIC_TITLES = {"reward_chosen": "reward of chosen", "reward_rejected": "reward of rejected",
                 "reward_margin": "reward margin", "reward_accuracy": "reward accuracy",
                 "reward": "mean reward",
                 "reward_std": "reward spread (std)", "completion_length": "completion length (tokens)",
                 "kl": "KL to the reference"}
NOTE_STYLE = {"color": "#b00020"}
COST_TITLES = {"estimated_peak_bytes": "estimated peak memory", "measured_peak_bytes": "measured peak memory",
               "projected_peak_bytes": "projected peak memory", "wall_time_s": "wall time"}
PAGE_STYLE = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table.nbtune-comparison, table.nbtune-details { border-collapse: collapse; font-size: 13px; }
table.nbtune-comparison th, table.nbtune-comparison td, table.nbtune-details th, table.nbtune-details td {
  border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
table.nbtune-comparison th, table.nbtune-details th { background: #f4f4f4; }
table.nbtune-comparison td:first-child, table.nbtune-comparison td:nth-child(2),
table.nbtune-details td:first-child { text-align: left; }
p.nbtune-recommendation { font-size: 15px; line-height: 1.45; max-width: 70em; }"""
# a failed variant's state cell wraps its reason instead of pushing the table wider than the page
REASON_STYLE = f"{FAILED_STYLE}; white-space: normal; min-width: 16em; max-width: 32em; text-align: left"


# ----- charts -----------------------------------------------------------------------------------------------
def loss_chart(curves: Mapping[str, Curve], labels: Mapping[str, str], x: str = "step", log_y: bool = True,
               smoothing: float = 0.6, show_eval: bool = True, table: Table | None = None) -> Any:
    """Training loss curves overlaid, smoothed by an exponential moving average (0 = raw), with eval loss as
    dashed lines; `labels` names each variant's legend entry; with `table`, the variants without a curve are
    named in a note."""
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
    if table is not None:
        _not_shown(fig, table, [name for name, (steps, _) in curves.items() if not steps])
    return fig


def _eval_xs(evals: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], x: str) -> list[Any]:
    if x != "tokens":
        return [e.get(LOSS_X[x]) for e in evals]
    # eval events carry the step; map it to the tokens seen at that step
    seen = {e.get("step"): e.get("tokens_seen") for e in steps}
    seen[0] = 0
    return [seen.get(e.get("step")) for e in evals]


def memory_chart(breakdowns: Mapping[str, Mapping[str, int]], labels: Mapping[str, str],
                 table: Table | None = None) -> Any:
    """Each variant's peak memory: projected to the table's target model and GPU when it has one (the small
    model's own peak is mostly fixed overhead), else the estimate as a stacked bar of the estimator's categories
    (`breakdowns` maps a variant to {category: bytes}; empty when the estimator could not tell)."""
    if table is not None and table.projected:
        return _projected_memory_chart(table)
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
    if table is not None:
        _not_shown(fig, table, list(table.failures()), lead="estimate only, no result")
    return fig


def _projected_memory_chart(table: Table) -> Any:
    """The projected peak of every variant on the target GPU, with the GPU's usable memory as a line."""
    import plotly.graph_objects as go

    target = table.target
    assert target is not None and target.model is not None
    rows = [r for r in table.rows if r.get("projected_peak_bytes") is not None]
    labels = table.labels()
    shown = [labels[r["variant"]] for r in rows]
    fig = go.Figure(go.Bar(x=shown, y=[r["projected_peak_bytes"] / 2**30 for r in rows], name="projected peak",
                           marker={"color": ["#1f77b4" if r.get("fits") else "#b00020" for r in rows]}))
    fig.add_trace(go.Scatter(x=shown, y=[target.gpu_bytes / 2**30] * len(rows), mode="lines",
                             name=f"{target.gpu_title} usable", line={"color": "#555", "dash": "dash"}))
    fig.update_layout(title=f"Projected peak memory of {target.model} on {target.gpu_title} (GiB, an estimate)",
                      yaxis_title="GPU GiB", template="plotly_white", height=450)
    missing = [r["variant"] for r in table.rows if r.get("projected_peak_bytes") is None]
    _not_shown(fig, table, missing, why={r["variant"]: r.get("projection_error") for r in table.rows})
    return fig


def quality_chart(table: Table) -> Any:
    """Eval quality (mean, with the spread over seeds as error bars) against the trainable share of parameters
    on a log axis; the recommended variant is starred."""
    import plotly.graph_objects as go

    rows = [r for r in table.scored(table.quality) if r.get("trainable_percent")]
    chosen = table.recommend().variant
    fig = go.Figure()
    for recommended, label, marker in ((False, "compared", {"size": 9, "color": "#1f77b4"}),
                                       (True, "recommended", {"size": 16, "symbol": "star", "color": "#d62728"})):
        group = [r for r in rows if (r["variant"] == chosen) is recommended]
        fig.add_trace(go.Scatter(
            x=[r["trainable_percent"] for r in group], y=[r[table.quality] for r in group],
            error_y={"type": "data", "array": [r.get("quality_std") or 0 for r in group], "visible": True},
            text=[r["variant"] for r in group], mode="markers+text", textposition="top center", name=label,
            marker=marker))
    better = "higher is better" if table.higher_is_better else "lower is better"
    words = quality_name(table)
    fig.update_layout(title=f"{words} ({better}) vs trainable share of parameters (★ recommended)",
                      xaxis_type="log", xaxis_title="trainable parameters (% of the model, log)", yaxis_title=words,
                      template="plotly_white", height=450, showlegend=False)
    _not_shown(fig, table, [r["variant"] for r in table.rows if r not in rows])
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
    _not_shown(fig, table, [n for n in rows if n not in front])  # no point to plot: say so, not leave it out
    return fig


def _not_shown(fig: Any, table: Table, names: Sequence[str], lead: str = "not shown",
               why: Mapping[str, str | None] | None = None) -> None:
    """Name on the chart the variants it does not show, each with why: a failed one's reason, else its state
    (or `why`'s entry)."""
    if not names:
        return
    failures, labels, rows = table.failures(), table.labels(), table.by_variant()
    parts = []
    for name in names:
        reason = failures.get(name) or (why or {}).get(name)
        label = labels.get(name, name) if name in failures else f"{name} ({rows[name]['state']})"
        parts.append(f"{label}: {_short(reason, 70)}" if reason else label)
    fig.add_annotation(text=html.escape(f"{lead}: ") + "<br>".join(html.escape(p) for p in parts),
                       xref="paper", yref="paper", x=0, y=-0.28, yanchor="top", showarrow=False,
                       font=NOTE_STYLE, xanchor="left", align="left")
    fig.update_layout(margin={"b": 100 + 18 * len(parts)}, height=(fig.layout.height or 450) + 18 * len(parts))


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def figures(curves: Mapping[str, Curve], breakdowns: Mapping[str, Mapping[str, int]], table: Table,
            x: str = "step", log_y: bool = True, smoothing: float = 0.6, cost: str = "memory") -> dict[str, Any]:
    """Every chart of a comparison, labelled from one table: loss curves, memory, quality vs trainable share and
    the Pareto chart."""
    labels = table.labels()
    drawn = {"loss": loss_chart(curves, labels, x=x, log_y=log_y, smoothing=smoothing, table=table),
             "memory": memory_chart(breakdowns, labels, table=table)}
    if not table.mixed_stages:
        return {**drawn, "quality": quality_chart(table), "pareto": pareto_chart(table, cost)}
    for stage, part in table.per_stage().items():  # each stage's quality is its own: one pair of charts each
        for kind, fig in (("quality", quality_chart(part)), ("pareto", pareto_chart(part, cost))):
            fig.update_layout(title=f"{STAGES[stage].title}: {fig.layout.title.text}")
            drawn[f"{kind} ({stage})"] = fig
    return drawn


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
    lines += _learning_rate_sentences(configs) + [_stage_sentence(configs)]
    devices = {s.device for s in summaries if s.device}
    lines.append(f"Trained one after another on one device ({', '.join(sorted(devices)) or 'not run yet'}).")
    if devices and "cuda" not in devices:
        lines.append("Peak memory is the GPU estimate of nbtune.estimate_memory: a CPU run has no GPU peak to "
                     "measure.")
    differs = _differences(configs)
    if differs:
        lines.append("Not the same across variants: " + "; ".join(differs) + ".")
    return lines


def _stage_sentence(configs: Mapping[str, TuneConfig]) -> str:
    titles = {name: STAGES[c.training.stage].title for name, c in configs.items()}
    if len(set(titles.values())) == 1:
        return f"Same stage for every variant: {next(iter(titles.values()))}."
    shown = "; ".join(f"{n}: {t}" for n, t in titles.items())
    return (f"Stages differ ({shown}): each stage's variants are judged by that stage's own eval measure, and "
            "ranked only among themselves.")


def _data_sentence(first: TuneConfig, summaries: Sequence[RunSummary], data: Mapping[str, Any]) -> str:
    fingerprint = {s.data.get("fingerprint") for s in summaries if s.data}
    same = "Same data and data order" if len(fingerprint) <= 1 else "Not the same data (stages need their own)"
    return (f"{same}: {source_text(first)}"
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


# ----- the answer in words ----------------------------------------------------------------------------------
def quality_text(table: Table, row: Mapping[str, Any]) -> str:
    """A variant's quality as the table and the recommendation show it: "0.9500 ± 0.0100 (3 seeds)", or "0.9500
    (1 seed: no spread)"; – without a result."""
    quality = table.quality_of(row)
    value = row.get(quality)
    if value is None:
        return "–"
    shown = format_value(quality, value)
    seeds = row.get("seeds") or 1
    if row.get("quality_std") is None:
        return f"{shown} (1 seed: no spread)" if seeds == 1 else f"{shown} ({seeds} seeds)"
    return f"{shown} ± {format_value(quality, row['quality_std'])} ({seeds} seeds)"


def cost_text(table: Table, row: Mapping[str, Any]) -> str:
    """What a variant costs, as the recommendation says it (figures formatted as in the table)."""
    share = f"{format_value('trainable_percent', row.get('trainable_percent'))} of the parameters trained"
    if table.cheapness == "projected_peak_bytes":
        return f"{format_value('projected_peak_bytes', row.get('projected_peak_bytes'))} projected peak, {share}"
    return share


def best_text(table: Table, names: Sequence[str], by: str) -> str:
    """The best variant by `by`, or the tie, in words with the figures."""
    rows = table.by_variant()
    words = QUALITY_WORDS.get(by, COLUMN_TITLES.get(by, by))

    def value(name: str) -> str:
        return quality_text(table, rows[name]) if by == table.quality else format_value(by, rows[name][by])

    if len(names) > 1:
        return (f"tie for the best {words}: " + ", ".join(f"{n} {value(n)}" for n in names)
                + " (means within the larger spread: no single best)")
    rest = [r for r in table.ranked(table.scored(by), by) if r["variant"] != names[0]]
    beyond = f", ahead of {rest[0]['variant']} ({value(rest[0]['variant'])}) beyond the spread" if rest else ""
    return f"{names[0]}: {words} {value(names[0])}{beyond}"


def recommendation_text(table: Table, with_target: bool = True) -> str:
    """Which method to use, in one paragraph derived from the table's figures: for the chosen GPU, which fits
    and reaches the best quality, which is cheapest within the near-best margin, and why. Where stages differ,
    one such paragraph per stage: their measures are not comparable."""
    if table.mixed_stages:
        return _per_stage_text(table)
    rec = table.recommend()
    parts = [_target_sentence(table, rec)] if with_target else []
    if rec.variant is None:
        parts.append("No method to recommend for this GPU: none of the finished methods is known to fit it."
                     if rec.unfit or rec.unknown else
                     f"No method to recommend yet: none has finished with an {QUALITY_WORDS[table.quality]}.")
    else:
        parts += [_leaders_sentence(table, rec), _pick_sentence(table, rec), _seeds_sentence(table)]
    failures = table.failures()
    if failures:
        labels = table.labels()
        parts.append("Not considered: " + "; ".join(f"{labels[n]}: {_short(r, 90).rstrip('.')}"
                                                    for n, r in failures.items()) + ".")
    return " ".join(parts)


def _per_stage_text(table: Table) -> str:
    """The recommendation within each stage, after a sentence saying why it is not one across them."""
    parts = table.per_stage()
    words = {stage: measure_words(part) for stage, part in parts.items()}
    if len(set(words.values())) > 1:
        why = "whose eval measures differ (" + "; ".join(f"{stage}: {w}" for stage, w in words.items()) + ")"
    else:  # the same words, but each stage's own loss and reference: scores of one stage are not the other's
        why = f"which each score {next(iter(words.values()))} after their own loss"
    lead = (f"The variants train different stages ({_join(list(parts))}), {why}: so the best is recommended "
            "within each stage, never ranked against another stage's.")
    once = table.target is None  # "no GPU chosen" is said once, not per stage
    within = [f"{STAGES[stage].title}: {recommendation_text(part, not once)}" for stage, part in parts.items()]
    return " ".join([lead] + ([_target_sentence(table, None)] if once else []) + within)


def measure_words(table: Table) -> str:
    """What a one-stage table's quality measures, in words: its stage's `accuracy_means` where it is the eval
    accuracy, else "eval loss"."""
    name = next(iter(table.qualities), "")
    if table.quality == "eval_accuracy" and name in STAGES and not table.mixed_stages:
        return of_task(name, table.task).accuracy_means
    return QUALITY_WORDS[table.quality]


def quality_name(table: Table) -> str:
    """The eval-quality column in words short enough for a sentence or an axis: "eval accuracy", "eval loss",
    or what the eval accuracy of the task or stage measures ("held-out exact match of greedy captions")."""
    meaning = measure_words(table)
    if table.quality != "eval_accuracy" or meaning == HELD_OUT_ACCURACY or table.mixed_stages:
        return QUALITY_WORDS[table.quality]
    return meaning.split(":")[0]


def near_words(table: Table) -> str:
    """The near-best margin in words."""
    from nbtune.comparison import NEAR_BEST_ACCURACY_POINTS, NEAR_BEST_LOSS_SHARE

    if table.quality == "eval_accuracy":
        return f"{NEAR_BEST_ACCURACY_POINTS * 100:g} accuracy points"
    return f"{NEAR_BEST_LOSS_SHARE * 100:g} % of the eval loss"


def _target_sentence(table: Table, rec: Recommendation | None) -> str:
    target, rows = table.target, table.by_variant()
    if target is None:
        return ("No GPU chosen (compare(..., gpu=..., target_model=...)): fit is not checked, and the cheapest "
                "method is the one that trains the smallest share of the parameters.")
    finished = len(table.scored(table.quality))
    where = f"{target.model} on {target.gpu_title}" if target.model else f"{target.gpu_title}"
    memory = table.cost_column("memory")
    unfit = "; ".join(f"{n} needs {format_value(memory, rows[n][memory])}" for n in rec.unfit)
    unknown = "; ".join(f"{n}: {_short(rows[n].get('projection_error') or 'no projection', 70)}"
                        for n in rec.unknown)
    fit = finished - len(rec.unfit) - len(rec.unknown)
    return (f"For {where} ({format_bytes(target.gpu_bytes)} usable): {fit} of {finished} finished methods fit by "
            f"their {COST_TITLES[memory]}" + (f" (not: {unfit})" if unfit else "")
            + (f" (cannot tell, no projection: {unknown})" if unknown else "") + ".")


def _leaders_sentence(table: Table, rec: Recommendation) -> str:
    rows, words = table.by_variant(), quality_name(table)
    if len(rec.leaders) > 1:
        shown = ", ".join(f"{n} {quality_text(table, rows[n])}" for n in rec.leaders)
        return f"{_join(rec.leaders)} tie for the best {words} ({shown}): their means differ by no more than the " \
               "larger spread."
    lead = rec.leaders[0]
    ahead = (f", ahead of {rec.runner_up} ({quality_text(table, rows[rec.runner_up])}) by more than the larger "
             "spread") if rec.runner_up else ""
    return f"Best {words} among those that fit: {lead} with {quality_text(table, rows[lead])}{ahead}."


def _pick_sentence(table: Table, rec: Recommendation) -> str:
    rows, chosen, margin = table.by_variant(), rec.variant, near_words(table)
    assert chosen is not None
    cost = cost_text(table, rows[chosen])
    if chosen in rec.leaders and len(rec.leaders) == 1:
        return (f"Use {chosen}: it reaches the best quality and no method within {margin} of it is cheaper "
                f"({cost}).")
    lead = rec.leaders[0]
    if chosen in rec.leaders:
        others = "".join(f"; {n}: {cost_text(table, rows[n])}" for n in rec.leaders if n != chosen and n in rec.near)
        return f"Use {chosen}, the cheapest of the tied methods within {margin} of the best ({cost}{others})."
    return (f"Use {chosen}: the cheapest within {margin} of the best, with {quality_text(table, rows[chosen])} "
            f"at {cost}, against {cost_text(table, rows[lead])} for {lead}.")


def _seeds_sentence(table: Table) -> str:
    seeds = {r.get("seeds") or 1 for r in table.scored(table.quality)}
    if seeds == {1}:
        return ("With 1 seed there is no spread, so only equal scores tie and small differences may be noise: "
                "compare(..., seeds=3) tells them apart.")
    return f"Spread: the sample standard deviation over {_join([str(s) for s in sorted(seeds)])} seeds."


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----- HTML -------------------------------------------------------------------------------------------------
def deciding_columns(table: Table) -> dict[str, str]:
    """The columns the table shows first, with their titles: the stage where stages differ, the quality ±
    spread (titled with what it measures), the stages' final metrics, trainable share, memory (projected to
    the target when there is one), whether it fits, time, and the state."""
    memory = table.cost_column("memory")
    target = table.target
    columns = {"variant": "variant"} | ({"stage": "stage"} if table.mixed_stages else {})
    quality = "quality within its stage" if table.mixed_stages else measure_words(table)
    columns["quality"] = f"{quality} (mean ± std)"
    columns |= {m: METRIC_TITLES.get(m, m.replace("_", " ")) for m in stage_columns(table)}
    columns |= {"trainable_percent": "trainable %",
                memory: (f"projected peak, {target.model} on {target.gpu_title}" if table.projected and target
                         else COST_TITLES[memory])}
    if target is not None:
        columns["fits"] = f"fits {target.gpu_title}"
    if table.projected:
        columns["projected_step_time_s"] = "projected step time"
    else:
        columns["wall_time_s"] = "wall time"
    columns["state"] = "state"
    return columns


def stage_columns(table: Table) -> list[str]:
    """The stages' metric columns that some row has a value of (DPO's rewards, GRPO's mean reward, ...)."""
    from nbtune.comparison import stage_metrics

    return [m for m in stage_metrics(table.qualities) if any(r.get(m) is not None for r in table.rows)]


def table_html(table: Table) -> str:
    """The table as an HTML fragment, numbers formatted for reading: the deciding columns, then every other one
    behind "details"; ★ marks the memory Pareto front, a failed variant's state cell gives its reason."""
    deciding = deciding_columns(table)
    details = {"variant": "variant"} | {c: t for c, t in COLUMN_TITLES.items()
                                        if c not in deciding and any(c in r for r in table.rows)}
    front = table.pareto("memory") if table.rows else {}
    failures = table.failures()
    quality, among = ("its stage's quality", " of its stage") if table.mixed_stages else (table.quality, "")
    return (_rows_html(table, deciding, front, failures, "nbtune-comparison") + _measures_html(table)
            + f"<p><small>★ non-dominated: no other variant{among} is both cheaper in peak memory and better in "
            f"{html.escape(quality)}. Ties: two variants tie when their means differ by no more than the "
            "larger spread (sample std over seeds).</small></p>"
            + f"<details><summary>details</summary>{_rows_html(table, details, {}, {}, 'nbtune-details')}</details>")


def _measures_html(table: Table) -> str:
    """Where stages differ, what the quality column measures for each stage's rows."""
    if not table.mixed_stages:
        return ""
    parts = "; ".join(f"{stage}: {measure_words(part)}" for stage, part in table.per_stage().items())
    return f"<p><small>Quality within its stage: {html.escape(parts)}.</small></p>"


def _rows_html(table: Table, columns: Mapping[str, str], front: Mapping[str, bool],
               failures: Mapping[str, str], css: str) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title in columns.values())
    body = []
    for r in table.rows:
        mark = " ★" if front.get(r["variant"]) else ""
        cells = "".join(_cell_html(table, c, r, failures) + (mark if c == "variant" else "") + "</td>"
                        for c in columns)
        title = f' title="{html.escape(r["error"])}"' if r.get("error") and r["variant"] in failures else ""
        failed = ' class="nbtune-failed"' if r["variant"] in failures else ""
        body.append(f"<tr{failed}{title}>{cells}</tr>")
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell_html(table: Table, column: str, row: Mapping[str, Any], failures: Mapping[str, str]) -> str:
    """A table cell (left open for a mark): the quality with its spread; a failed variant's state cell shows
    the reason, in red."""
    if column == "quality":
        return f"<td>{html.escape(quality_text(table, row))}"
    reason = failures.get(row["variant"])
    if column != "state" or reason is None:
        return f"<td>{html.escape(format_value(column, row.get(column)))}"
    short = reason if len(reason) <= 90 else reason[:89] + "…"
    return f'<td style="{REASON_STYLE}">{html.escape(row["state"])}: {html.escape(short)}'


_FORMATS = {"trainable_params": lambda v: f"{int(v):,}", "trainable_percent": "{:.3g}%".format,
            "wall_time_s": "{:.1f} s".format, "tokens_per_s": "{:,.0f}".format, "learning_rate": "{:g}".format,
            "projected_step_time_s": "{:.3g} s".format, "projected_tokens_per_s": "{:,.0f}".format,
            "run_ids": lambda v: ", ".join(str(i) for i in v if i)}


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


def recommendation_html(table: Table) -> str:
    return f'<p class="nbtune-recommendation"><b>Recommendation.</b> {html.escape(recommendation_text(table))}</p>'


def notebook_html(fairness_lines: Sequence[str], table: Table) -> str:
    """What a notebook shows for a comparison: the recommendation, the fairness statement and the table (static
    HTML)."""
    return (f"<div><b>nbtune comparison</b>{recommendation_html(table)}{_fairness_html(fairness_lines)}"
            f"{table_html(table)}</div>")


def _answers_html(answers: Any) -> str:
    """The side-by-side answers (`Comparison.generations`), when some were asked for."""
    if answers is None:
        return ""
    what = "Predicted labels" if answers.classifies else "Answers side by side"
    return f"<h2>{what}</h2>{answers.to_html()}"


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
{recommendation_html(table)}
{_failures_html(table, len(comparison.runs))}
<h2>Fairness</h2>{_fairness_html(comparison.fairness())}
<h2>Table</h2>{table_html(table)}
{_answers_html(comparison.answers)}
<h2>Charts</h2>
{"".join(f'<div class="nbtune-chart">{c}</div>' for c in charts)}
</body></html>
"""
