"""Training charts as plain plotly figure dicts, and the display bundles that carry them.

Figures are built as dicts (no plotly import, no validation) so a live update costs a few milliseconds. A live
bundle carries the plotly JSON; the final bundle adds a PNG (through kaleido, when it can render) so a notebook
opened without a kernel — GitHub, nbviewer, Colab — still shows the chart, and an HTML fallback otherwise.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from typing import Any

from nbtune.widgets.progress import EVAL_TRACES, PANELS, TRACES, RunProgress

log = logging.getLogger("nbtune")

PLOTLY_MIME = "application/vnd.plotly.v1+json"
FINAL_MAX_POINTS = 5000  # per trace in the saved record; the store keeps every point


_AXIS = {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "linecolor": "#c8d4e3", "automargin": True}


def _round(values: list[Any]) -> list[Any]:
    return [None if v is None else float(f"{v:.6g}") for v in values]


def _layout(title: str, eval_panel: str) -> dict[str, Any]:
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
        layout[f"yaxis{n}"] = {"domain": [y1 - height, y1], "anchor": f"x{n}", **_AXIS, "rangemode": "tozero"
                               if name in ("Tokens / s", "Memory (GiB)") else "normal"}
        label = eval_panel if name == "Eval" else name
        layout["annotations"].append({"text": f"<b>{label}</b>", "x": x0 + width / 2, "y": y1 + 0.02,
                                      "xref": "paper", "yref": "paper", "showarrow": False,
                                      "xanchor": "center", "yanchor": "bottom", "font": {"size": 12}})
    layout["yaxis2"]["exponentformat"] = "e"
    return layout


def training_figure(progress: RunProgress, title: str, final: bool = False) -> dict[str, Any]:
    """The six-panel training chart of a run's progress as a plotly figure dict.

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
    return {"data": data, "layout": _layout(title, shown_eval.capitalize())}


def point_counts(figure: dict[str, Any]) -> dict[str, int]:
    return {t["name"]: len(t["x"]) for t in figure["data"]}


def live_bundle(figure: dict[str, Any], with_html: bool = False) -> dict[str, Any]:
    """What a live chart update sends: the plotly JSON (rendered by JupyterLab, Notebook 7 and VS Code)."""
    bundle: dict[str, Any] = {PLOTLY_MIME: figure, "text/plain": _plain(figure)}
    if with_html:  # Colab renders no plotly JSON; its HTML output loads plotly.js itself
        bundle["text/html"] = figure_html(figure)
    return bundle


def final_bundle(figure: dict[str, Any], png: bool | None = None) -> dict[str, Any]:
    """The record a finished chart leaves: plotly JSON, plus a PNG where kaleido can render one (GitHub,
    nbviewer, Colab show it) or else an HTML version that loads plotly.js when opened."""
    bundle: dict[str, Any] = {PLOTLY_MIME: figure, "text/plain": _plain(figure)}
    image = figure_png(figure) if (png if png is not None else static_png_enabled()) else None
    if image is not None:
        bundle["image/png"] = base64.b64encode(image).decode("ascii")
    else:
        bundle["text/html"] = figure_html(figure)
    return bundle


def _plain(figure: dict[str, Any]) -> str:
    counts = ", ".join(f"{name}: {n} points" for name, n in point_counts(figure).items() if n)
    return f"nbtune training chart ({counts or 'no points yet'})"


def static_png_enabled() -> bool:
    return os.environ.get("NBTUNE_STATIC_PNG", "1") not in ("0", "false", "no")


def figure_png(figure: dict[str, Any], timeout: float = 60.0) -> bytes | None:
    """The figure as PNG bytes through kaleido, or None (kaleido or a browser missing, or too slow)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    result: dict[str, Any] = {}

    def render() -> None:
        try:
            import plotly.io as pio

            result["png"] = pio.to_image(figure, format="png", width=1100, height=470, scale=1)
        except Exception as err:  # kaleido without a browser, or a browser that fails to start
            result["error"] = err

    worker = threading.Thread(target=render, name="nbtune-png", daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" in result or "png" not in result:
        log.info("nbtune: no PNG fallback for the chart (%s)", result.get("error", "kaleido timed out"))
    return result.get("png")


def figure_html(figure: dict[str, Any]) -> str:
    """The figure as an HTML fragment that loads plotly.js from its CDN (for renderers without plotly JSON)."""
    import plotly.io as pio

    # Through a Figure, so a template given by name ("plotly_white") is resolved; plotly.io expects a dict there.
    return pio.to_html(to_plotly_figure(figure), include_plotlyjs="cdn", full_html=False)


def to_plotly_figure(figure: dict[str, Any]) -> Any:
    """A plotly `go.Figure` of a figure dict (for users who want to restyle or save it)."""
    import plotly.graph_objects as go

    return go.Figure(figure)
