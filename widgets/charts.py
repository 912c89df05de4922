"""Training charts as plain plotly figure dicts, what changed between two of them, and the display bundles that
carry them.

Figures are built as dicts (no plotly import, no validation) so a live update costs a few milliseconds; the
live dashboard sends only what `figure_changes` finds changed to one plotly FigureWidget. The final bundle
carries the plotly JSON and a PNG (nbtune.static_image) so a notebook opened without a kernel — GitHub,
nbviewer, Colab — still shows the chart; never HTML, which nbconvert would prefer and which loads plotly.js
from a CDN (blank offline).
"""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from nbtune.widgets.progress import (
    EVAL_TRACES,
    PANELS,
    THROUGHPUT,
    TRACES,
    RunProgress,
    accuracy_words,
    stage_metric,
    stage_trace_name,
)

log = logging.getLogger("nbtune")

PLOTLY_MIME = "application/vnd.plotly.v1+json"
FINAL_MAX_POINTS = 5000  # per trace in the saved record; the store keeps every point
BEST_EVAL = "best eval"  # the star on the loss panel at the lowest eval loss so far


_AXIS = {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "linecolor": "#c8d4e3", "automargin": True}


def _round(values: list[Any]) -> list[Any]:
    return [None if v is None else float(f"{v:.6g}") for v in values]


ROW_PX, GAP_PX, MARGIN_PX = 153.5, 63.0, 100  # one panel row, the gap between rows, the top and bottom margins


@dataclass(frozen=True)
class Panel:
    """One panel of the chart: its title (with what it means on hover) and its y axis's own settings."""

    title: str
    yaxis: dict[str, Any] = field(default_factory=dict)
    hover: str | None = None


def _layout(title: str, panels: list[Panel], total_steps: int | None, log_loss: bool) -> dict[str, Any]:
    """Panels three a row on one step axis (xaxis2.. match xaxis), from 0 to the run's total steps once known,
    so every panel agrees from the first point (a lone point would otherwise autorange to -1..1). Each row
    keeps its height in pixels: a stage's third row makes the figure taller, not the panels flatter."""
    cols, rows = 3, -(-len(panels) // 3)
    plot_px = rows * ROW_PX + (rows - 1) * GAP_PX
    gap_x, gap_y, height = 0.07, GAP_PX / plot_px, ROW_PX / plot_px
    width = (1 - gap_x * (cols - 1)) / cols
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "height": round(plot_px + MARGIN_PX), "margin": {"l": 50, "r": 20, "t": 60, "b": 40},
        "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "x unified", "uirevision": "nbtune",
        "font": {"family": "Arial, sans-serif", "size": 11, "color": "#2a3f5f"},
        "legend": {"orientation": "h", "y": round(-44 / plot_px, 4), "x": 0, "font": {"size": 11}},
        "annotations": [],
    }
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x0 = c * (width + gap_x)
        y1 = 1 - r * (height + gap_y)
        n = "" if i == 0 else str(i + 1)
        layout[f"xaxis{n}"] = {"domain": [x0, x0 + width], "anchor": f"y{n}", "showgrid": True, **_AXIS,
                               "title": {"text": "step", "font": {"size": 10}} if i + cols >= len(panels) else None}
        if i:
            layout[f"xaxis{n}"]["matches"] = "x"
        layout[f"yaxis{n}"] = {"domain": [max(round(y1 - height, 6), 0.0), round(y1, 6)], "anchor": f"x{n}", **_AXIS, "rangemode": "normal",
                               **panel.yaxis}
        note = {"text": f"<b>{panel.title}</b>", "x": x0 + width / 2, "y": y1 + 0.02 * 370 / plot_px,
                "xref": "paper", "yref": "paper", "showarrow": False, "xanchor": "center", "yanchor": "bottom",
                "font": {"size": 12}}
        layout["annotations"].append({**note, "hovertext": panel.hover} if panel.hover else note)
    layout["yaxis2"]["exponentformat"] = "e"
    layout["xaxis"].update({"range": [0, total_steps], "autorange": False} if total_steps else {"autorange": True})
    layout["yaxis"]["type"] = "log" if log_loss else "linear"  # a log loss axis shows overfitting late in a run
    return layout


def _axis_names(panel: int) -> tuple[str, str]:
    n = "" if panel == 0 else str(panel + 1)
    return f"x{n}", f"y{n}"


def training_figure(progress: RunProgress, title: str, final: bool = False, log_loss: bool = False) -> dict[str, Any]:
    """The training chart of a run's progress as a plotly figure dict: six panels, and a row of the stage's
    own (DPO's rewards, GRPO's reward and KL) when it logs them; the loss axis on a log scale if `log_loss`.

    Live: each trace shows its bounded view (at most the series' max_points). Final: every point, up to
    FINAL_MAX_POINTS per trace.
    """
    stage, series = progress.stage, progress.series
    evals = [n for n in EVAL_TRACES if stage.language_model_loss or n != "eval perplexity"]
    shown_eval = next((name for name in evals if len(series[name])), evals[-1])
    points = (lambda s: s.full(FINAL_MAX_POINTS)) if final else (lambda s: s.view())
    data = []
    speed, speed_title = THROUGHPUT[stage.throughput]
    for trace in TRACES:
        if (trace.name in EVAL_TRACES and trace.name != shown_eval) or (trace.panel == "Throughput" and
                                                                        trace.name != speed):
            continue
        xs, ys = points(series[trace.name])
        if not xs:  # plotly.js draws NaN paths for an empty trace beside a one-point trace; leave it out
            continue
        x, y = _axis_names(PANELS.index(trace.panel))
        data.append({
            "type": "scatter", "name": trace.name, "x": list(xs), "y": _round(ys), "xaxis": x, "yaxis": y,
            "mode": "lines+markers" if trace.event == "eval" else "lines",
            "line": {"color": trace.color, "width": 2}, "marker": {"size": 6},
            "showlegend": trace.panel == "Loss",
        })
    if progress.best_eval is not None:
        data.append(_best_eval_marker(*progress.best_eval))
    accuracy = shown_eval == "eval accuracy"
    eval_panel = Panel(accuracy_words(stage).capitalize() if accuracy else shown_eval.capitalize(),
                       hover=stage.accuracy_means if accuracy else None)
    panels = [eval_panel if name == "Eval" else Panel(speed_title if name == "Throughput" else name, {
        "rangemode": "tozero"} if name in ("Throughput", "Memory (GiB)") else {}) for name in PANELS]
    data += _stage_traces(progress, panels, points)
    return {"data": data, "layout": _layout(title, panels, progress.total_steps, log_loss)}


def _stage_traces(progress: RunProgress, panels: list[Panel], points: Any) -> list[dict[str, Any]]:
    """The traces of the stage's own metrics (none for SFT), each in its panel, appended to `panels` as they
    first hold a point: step values as lines, eval values as markers, a spread as dotted lines ± its mean."""
    stage, out = progress.stage, []
    for metric in stage.logged.values():
        how = stage_metric(metric)
        for kind in ("step", "eval"):
            name = stage_trace_name(metric if how.spread_of is None else how.spread_of, kind)
            mean = progress.stage_series.get(name)
            spread = progress.stage_series.get(stage_trace_name(metric, kind)) if how.spread_of else None
            if mean is None or not len(mean) or (how.spread_of and spread is None):
                continue
            title = how.panel.format(stage=stage.name.upper())
            if all(p.title != title for p in panels):
                panels.append(Panel(title, {"range": [0, 1], "autorange": False} if how.share else {}))
            x, y = _axis_names(next(i for i, p in enumerate(panels) if p.title == title))
            style = {"type": "scatter", "xaxis": x, "yaxis": y, "line": {"color": how.color, "width": 2},
                     "marker": {"size": 7, "symbol": "diamond", "color": how.color}}
            if spread is not None:
                out += _spread(name, metric, points(mean), points(spread), style, kind)
                continue
            xs, ys = points(mean)
            out.append({**style, "name": name, "x": list(xs), "y": _round(ys), "showlegend": kind == "step",
                        "mode": "lines" if kind == "step" else "markers"})
    return out


def _spread(name: str, metric: str, mean: tuple[list[float], list[Any]], spread: tuple[list[float], list[Any]],
            style: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """Two dotted lines at mean + spread and mean - spread, where both have a value at the same step."""
    by_step = dict(zip(*spread, strict=True))
    steps = [(x, m, by_step[x]) for x, m in zip(*mean, strict=True) if m is not None and by_step.get(x) is not None]
    words = metric.replace("_", " ")
    line = {**style["line"], "width": 1, "dash": "dot"}
    return [{**style, "name": f"{name} {sign} {words}", "x": [x for x, _, _ in steps], "line": line,
             "y": _round([m + s if sign == "+" else m - s for _, m, s in steps]), "legendgroup": f"{name} spread",
             "showlegend": kind == "step" and sign == "+", "mode": "lines" if kind == "step" else "markers"}
            for sign in ("+", "−")]


def _best_eval_marker(step: int, loss: float) -> dict[str, Any]:
    text = f"best eval loss {loss:.4g} at step {step}"
    return {"type": "scatter", "name": BEST_EVAL, "x": [step], "y": _round([loss]), "xaxis": "x", "yaxis": "y",
            "mode": "markers", "text": [text], "hovertemplate": "%{text}<extra></extra>", "showlegend": True,
            "marker": {"symbol": "star", "size": 15, "color": "#ffb300", "line": {"color": "#e65100", "width": 1}}}


@dataclass
class FigureChanges:
    """What a shown figure needs to become another: traces to add (with their first points) and to remove,
    the changed properties of each kept trace (by name), and the changed top-level layout entries."""

    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restyled: dict[str, dict[str, Any]] = field(default_factory=dict)
    relayout: dict[str, Any] = field(default_factory=dict)


def figure_changes(shown: dict[str, Any], figure: dict[str, Any]) -> FigureChanges:
    """The difference from figure dict `shown` to `figure` (traces matched by name)."""
    before = {trace["name"]: trace for trace in shown["data"]}
    names = {trace["name"] for trace in figure["data"]}
    changes = FigureChanges(removed=[name for name in before if name not in names])
    for trace in figure["data"]:
        old = before.get(trace["name"])
        if old is None:
            changes.added.append(trace)
            continue
        changed = {key: value for key, value in trace.items() if old.get(key) != value}
        if changed:
            changes.restyled[trace["name"]] = changed
    changes.relayout = {key: value for key, value in figure["layout"].items() if shown["layout"].get(key) != value}
    return changes


def point_counts(figure: dict[str, Any]) -> dict[str, int]:
    return {t["name"]: len(t["x"]) for t in figure["data"]}


def live_bundle(figure: dict[str, Any], with_html: bool = False) -> dict[str, Any]:
    """What a live chart update sends: the plotly JSON (rendered by JupyterLab, Notebook 7 and VS Code)."""
    bundle: dict[str, Any] = {PLOTLY_MIME: figure, "text/plain": _plain(figure)}
    if with_html:  # Colab renders no plotly JSON; its HTML output loads plotly.js itself
        bundle["text/html"] = figure_html(figure)
    return bundle


def final_bundle(figure: dict[str, Any], png: bool | None = None) -> dict[str, Any]:
    """The record a finished chart leaves: plotly JSON and text, plus a PNG (GitHub, nbviewer and Colab show
    it) unless `png` is False or NBTUNE_STATIC_PNG=0. No HTML: nbconvert prefers it, and it needs plotly.js."""
    from nbtune.static_image import png as draw_png  # kaleido if it answers, else matplotlib

    bundle: dict[str, Any] = {PLOTLY_MIME: figure, "text/plain": _plain(figure)}
    image = draw_png(figure) if (png if png is not None else static_png_enabled()) else None
    if image is not None:
        bundle["image/png"] = base64.b64encode(image).decode("ascii")
    return bundle


def _plain(figure: dict[str, Any]) -> str:
    counts = ", ".join(f"{name}: {n} points" for name, n in point_counts(figure).items() if n)
    return f"nbtune training chart ({counts or 'no points yet'})"


def static_png_enabled() -> bool:
    return os.environ.get("NBTUNE_STATIC_PNG", "1") not in ("0", "false", "no")


def figure_html(figure: dict[str, Any]) -> str:
    """The figure as an HTML fragment that loads plotly.js from its CDN (for renderers without plotly JSON)."""
    import plotly.io as pio

    # Through a Figure, so a template given by name ("plotly_white") is resolved; plotly.io expects a dict there.
    return pio.to_html(to_plotly_figure(figure), include_plotlyjs="cdn", full_html=False)


def to_plotly_figure(figure: dict[str, Any]) -> Any:
    """A plotly `go.Figure` of a figure dict (for users who want to restyle or save it)."""
    import plotly.graph_objects as go

    return go.Figure(figure)
