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

from nbtune.widgets.progress import EVAL_TRACES, PANELS, TRACES, RunProgress

log = logging.getLogger("nbtune")

PLOTLY_MIME = "application/vnd.plotly.v1+json"
FINAL_MAX_POINTS = 5000  # per trace in the saved record; the store keeps every point
BEST_EVAL = "best eval"  # the star on the loss panel at the lowest eval loss so far


_AXIS = {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "linecolor": "#c8d4e3", "automargin": True}


def _round(values: list[Any]) -> list[Any]:
    return [None if v is None else float(f"{v:.6g}") for v in values]


def _layout(title: str, eval_panel: str, total_steps: int | None, log_loss: bool) -> dict[str, Any]:
    """Six panels on one step axis (xaxis2..6 match xaxis), from 0 to the run's total steps once known, so
    every panel agrees from the first point (a lone point would otherwise autorange to -1..1)."""
    cols, rows, gap_x, gap_y = 3, 2, 0.07, 0.17
    width = (1 - gap_x * (cols - 1)) / cols
    height = (1 - gap_y) / rows
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "height": 470, "margin": {"l": 50, "r": 20, "t": 60, "b": 40},
        "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "x unified", "uirevision": "nbtune",
        "font": {"family": "Arial, sans-serif", "size": 11, "color": "#2a3f5f"},
        "legend": {"orientation": "h", "y": -0.12, "x": 0, "font": {"size": 11}},
        "annotations": [],
    }
    for i, name in enumerate(PANELS):
        r, c = divmod(i, cols)
        x0 = c * (width + gap_x)
        y1 = 1 - r * (height + gap_y)
        n = "" if i == 0 else str(i + 1)
        layout[f"xaxis{n}"] = {"domain": [x0, x0 + width], "anchor": f"y{n}", "showgrid": True, **_AXIS,
                               "title": {"text": "step", "font": {"size": 10}} if r == 1 else None}
        if i:
            layout[f"xaxis{n}"]["matches"] = "x"
        layout[f"yaxis{n}"] = {"domain": [y1 - height, y1], "anchor": f"x{n}", **_AXIS, "rangemode": "tozero"
                               if name in ("Tokens / s", "Memory (GiB)") else "normal"}
        label = eval_panel if name == "Eval" else name
        layout["annotations"].append({"text": f"<b>{label}</b>", "x": x0 + width / 2, "y": y1 + 0.02,
                                      "xref": "paper", "yref": "paper", "showarrow": False,
                                      "xanchor": "center", "yanchor": "bottom", "font": {"size": 12}})
    layout["yaxis2"]["exponentformat"] = "e"
    layout["xaxis"].update({"range": [0, total_steps], "autorange": False} if total_steps else {"autorange": True})
    layout["yaxis"]["type"] = "log" if log_loss else "linear"  # a log loss axis shows overfitting late in a run
    return layout


def training_figure(progress: RunProgress, title: str, final: bool = False, log_loss: bool = False) -> dict[str, Any]:
    """The six-panel training chart of a run's progress as a plotly figure dict, the loss axis on a log scale
    if `log_loss`.

    Live: each trace shows its bounded view (at most the series' max_points). Final: every point, up to
    FINAL_MAX_POINTS per trace.
    """
    series = progress.series
    shown_eval = next((name for name in EVAL_TRACES if len(series[name])), EVAL_TRACES[-1])
    data = []
    for trace in TRACES:
        if trace.name in EVAL_TRACES and trace.name != shown_eval:
            continue
        xs, ys = series[trace.name].full(FINAL_MAX_POINTS) if final else series[trace.name].view()
        if not xs:  # plotly.js draws NaN paths for an empty trace beside a one-point trace; leave it out
            continue
        panel = PANELS.index(trace.panel)
        n = "" if panel == 0 else str(panel + 1)
        data.append({
            "type": "scatter", "name": trace.name, "x": list(xs), "y": _round(ys), "xaxis": f"x{n}",
            "yaxis": f"y{n}", "mode": "lines+markers" if trace.event == "eval" else "lines",
            "line": {"color": trace.color, "width": 2}, "marker": {"size": 6},
            "showlegend": trace.panel == "Loss",
        })
    if progress.best_eval is not None:
        data.append(_best_eval_marker(*progress.best_eval))
    layout = _layout(title, shown_eval.capitalize(), progress.total_steps, log_loss)
    return {"data": data, "layout": layout}


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
