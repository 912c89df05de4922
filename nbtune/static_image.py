"""Charts as images for a saved notebook: a plotly figure as PNG, drawn without a browser.

A notebook opened without a kernel (nbconvert HTML, GitHub, nbviewer) renders no plotly JSON and, offline, cannot
load plotly.js, so a chart nbtune shows carries a PNG beside its plotly JSON (`figure_bundle`): JupyterLab and
VS Code draw the JSON (interactive), the others show the PNG. The PNG comes from kaleido when it is installed and
answers within seconds, else from matplotlib, which draws what nbtune's charts use: scatter and bar traces,
subplot domains, log and category axes, titles, legends and annotations.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import threading
from typing import Any

log = logging.getLogger("nbtune")

PLOTLY_MIME = "application/vnd.plotly.v1+json"
KALEIDO_TIMEOUT_S = 5.0  # a kaleido that cannot start its browser hangs; matplotlib draws instead
DPI = 100
PT = 72 / DPI  # plotly sizes are in pixels, matplotlib's in points
DEFAULT_SIZE = (1000, 450)  # px, when the layout gives none (450: plotly's own default height)
DEFAULT_MARGIN = {"l": 80, "r": 80, "t": 100, "b": 80}  # plotly's defaults, px
PLOTLY_COLORS = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880",
                 "#FF97FF", "#FECB52")  # plotly's default colorway, for traces that name no colour
DASHES = {"solid": "-", "dot": ":", "dash": "--", "longdash": "--", "dashdot": "-.", "longdashdot": "-."}
SYMBOLS = {"circle": "o", "square": "s", "diamond": "D", "cross": "P", "x": "X", "triangle-up": "^",
           "triangle-down": "v", "triangle-left": "<", "triangle-right": ">", "pentagon": "p", "hexagon": "h",
           "star": "*"}
HORIZONTAL = {"left": "left", "center": "center", "right": "right"}  # plotly's xanchor; "auto" is centred
VERTICAL = {"top": "top", "middle": "center", "bottom": "bottom"}  # plotly's yanchor


def png(figure: Any) -> bytes | None:
    """The figure (a plotly figure dict, as nbtune's charts build them, or a `go.Figure`) as PNG bytes, or
    None when it cannot be drawn (the reason is logged at info)."""
    try:
        spec = _as_dict(figure)
        return _kaleido_png(spec) or _matplotlib_png(spec)
    except Exception as err:  # an image is a fallback: a chart it cannot draw keeps its plotly JSON only
        log.info("nbtune: no PNG for the chart (%s: %s)", type(err).__name__, err)
        return None


def figure_bundle(figure: Any) -> dict[str, Any]:
    """What nbtune displays for a chart: plotly JSON (interactive where a renderer reads it), a PNG where one
    can be drawn (for saved notebooks), and a line of text."""
    spec = figure if isinstance(figure, dict) else _json_dict(figure)
    bundle: dict[str, Any] = {PLOTLY_MIME: spec, "text/plain": _plain(spec)}
    image = png(spec)
    if image is not None:
        bundle["image/png"] = base64.b64encode(image).decode("ascii")
    return bundle


def show_figure(figure: Any) -> None:
    """Show a plotly figure in a notebook: interactive in JupyterLab and VS Code, and as an image in the saved
    notebook (GitHub, nbviewer, nbconvert HTML), which plotly's own display leaves blank offline."""
    from IPython.display import display

    display(figure_bundle(figure), raw=True)


def _json_dict(figure: Any) -> dict[str, Any]:
    """A go.Figure as plotly's own notebook renderer sends it: JSON-compatible, arrays typed (base64)."""
    import plotly.io as pio

    return json.loads(pio.to_json(figure, validate=False, remove_uids=False))


def _as_dict(figure: Any) -> dict[str, Any]:
    return figure.to_plotly_json() if hasattr(figure, "to_plotly_json") else figure


def _plain(spec: dict[str, Any]) -> str:
    title = _text((spec.get("layout") or {}).get("title"))[0]
    traces = len(spec.get("data") or [])
    return f"plotly chart{': ' + title if title else ''} ({traces} traces)"


# ----- kaleido ----------------------------------------------------------------------------------------------
def _kaleido_png(spec: dict[str, Any]) -> bytes | None:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    result: dict[str, Any] = {}

    def render() -> None:
        try:
            import plotly.io as pio

            layout = spec.get("layout") or {}
            result["png"] = pio.to_image(spec, format="png", width=layout.get("width") or DEFAULT_SIZE[0],
                                         height=layout.get("height") or DEFAULT_SIZE[1])
        except Exception as err:  # kaleido without a browser, or a browser that fails to start
            result["error"] = err

    worker = threading.Thread(target=render, name="nbtune-kaleido", daemon=True)
    worker.start()
    worker.join(KALEIDO_TIMEOUT_S)
    if "png" not in result:
        log.info("nbtune: kaleido drew no PNG (%s); drawing with matplotlib", result.get("error", "timed out"))
    return result.get("png")


# ----- matplotlib -------------------------------------------------------------------------------------------
def _matplotlib_png(spec: dict[str, Any]) -> bytes:
    """Draw the figure on matplotlib's Agg canvas (never pyplot: the user's backend stays as it is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout, traces = spec.get("layout") or {}, spec.get("data") or []
    size = (int(layout.get("width") or DEFAULT_SIZE[0]), int(layout.get("height") or DEFAULT_SIZE[1]))
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI,
                 facecolor=_color(_look(layout, "paper_bgcolor")) or "white")
    FigureCanvasAgg(fig)
    legend = _legend_entries(layout, traces)
    area = _plot_area(layout, size, legend)
    axes, artists = _draw_traces(fig, layout, traces, area)
    _draw_legend(fig, layout, legend, artists, area, size[0])
    _draw_title(fig, layout, size[1])
    for note in layout.get("annotations") or []:
        _draw_annotation(fig, note, area, axes)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def _look(layout: dict[str, Any], *path: str) -> Any:
    """A layout value, else the template's (go.Figure carries its template expanded in the layout)."""
    template = layout.get("template")
    for source in (layout, (template.get("layout") or {}) if isinstance(template, dict) else {}):
        value: Any = source
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _text(title: Any) -> tuple[str, bool]:
    """A plotly text (a string, or a dict with "text") as plain text, and whether it was bold (<b>)."""
    raw = title.get("text") if isinstance(title, dict) else title
    if not raw:
        return "", False
    raw = str(raw)
    plain = html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<br\s*/?>", "\n", raw)))
    return plain.replace("$", r"\$"), "<b>" in raw  # "$" would start matplotlib's mathtext


def _color(value: Any) -> Any:
    """A plotly colour as matplotlib takes it ("rgb(…)"/"rgba(…)" become tuples); None for anything else."""
    from matplotlib.colors import is_color_like

    if not isinstance(value, str):
        return None
    if value.startswith("rgb"):
        parts = [float(p) for p in re.findall(r"[\d.]+", value)]
        return tuple(p / 255 for p in parts[:3]) + tuple(parts[3:4])
    return value if is_color_like(value) else None


def _values(data: Any) -> list[Any]:
    """Trace data as a list: plotly sends numpy arrays as {"dtype", "bdata"} (base64), else plain lists."""
    if data is None:
        return []
    if isinstance(data, dict) and "bdata" in data:
        import numpy as np

        array = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
        if data.get("shape"):
            array = array.reshape([int(n) for n in str(data["shape"]).split(",")])
        return array.tolist()
    if hasattr(data, "tolist"):
        return data.tolist()
    return list(data) if isinstance(data, list | tuple) else [data]


def _numbers(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


# ----- layout: legend and plot area -------------------------------------------------------------------------
def _legend_entries(layout: dict[str, Any], traces: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(trace index, name) of the traces the legend names, in its order (plotly hides a one-entry legend)."""
    named = [(i, _text(t["name"])[0]) for i, t in enumerate(traces) if t.get("showlegend", True) is not False
             and t.get("visible", True) is True and t.get("name") not in (None, "")]
    shown = layout.get("showlegend")
    if shown is False or (shown is None and len(named) < 2):
        return []
    return named[::-1] if "reversed" in str(_look(layout, "legend", "traceorder") or "") else named


def _legend_columns(legend: list[tuple[int, str]], width: int) -> int:
    """How many entries fit side by side in a horizontal legend across 90% of the figure."""
    longest = max(len(name) for _, name in legend)
    return max(1, min(len(legend), int(width * 0.9 // (36 + 6 * longest))))


def _plot_area(layout: dict[str, Any], size: tuple[int, int], legend: list[tuple[int, str]]) -> list[float]:
    """The plot area [left, bottom, right, top] in figure fractions: the margins, widened for the legend as
    plotly's automargin does (below the plot for a horizontal legend, at the right otherwise)."""
    width, height = size
    margin = {**DEFAULT_MARGIN, **(layout.get("margin") or {})}
    right, bottom = margin["r"], margin["b"]
    if legend and _look(layout, "legend", "orientation") == "h":
        bottom += 20 * math.ceil(len(legend) / _legend_columns(legend, width)) + 6
    elif legend:
        right = max(right, 60 + 7 * max(len(name) for _, name in legend))
    return [margin["l"] / width, bottom / height, 1 - min(right, width / 2) / width, 1 - margin["t"] / height]


def _draw_legend(fig: Any, layout: dict[str, Any], legend: list[tuple[int, str]], artists: dict[int, Any],
                 area: list[float], width: int) -> None:
    entries = [(artists[i], name) for i, name in legend if i in artists]
    if not entries:
        return
    style = {"frameon": False, "fontsize": 8.5, "handlelength": 2.2}
    if _look(layout, "legend", "orientation") == "h":
        fig.legend(*zip(*entries, strict=True), loc="lower left", bbox_to_anchor=(area[0], 0.005),
                   ncol=_legend_columns(legend, width), **style)
    else:
        fig.legend(*zip(*entries, strict=True), loc="upper left", bbox_to_anchor=(area[2] + 0.01, area[3]), **style)


def _draw_title(fig: Any, layout: dict[str, Any], height: int) -> None:
    text, bold = _text(layout.get("title"))
    if not text:
        return
    x = _look(layout, "title", "x")
    x = 0.5 if x is None else x
    top = {**DEFAULT_MARGIN, **(layout.get("margin") or {})}["t"]
    size = (_look(layout, "title", "font", "size") or 17) * PT
    fig.text(x, 1 - top / 2 / height, text, fontsize=size, fontweight="bold" if bold else "normal",
             ha="left" if x < 1 / 3 else "right" if x > 2 / 3 else "center", va="center",
             color=_color(_look(layout, "font", "color")) or "#2a3f5f")


def _draw_annotation(fig: Any, note: dict[str, Any], area: list[float], axes: dict[tuple[str, str], Any]) -> None:
    """An annotation placed on the paper (the plot area, 0..1) or at data coordinates of its axes."""
    text, bold = _text(note.get("text"))
    style = {"fontsize": ((note.get("font") or {}).get("size") or 12) * PT,
             "fontweight": "bold" if bold else "normal", "color": _color((note.get("font") or {}).get("color")),
             "ha": HORIZONTAL.get(note.get("xanchor"), "center"), "va": VERTICAL.get(note.get("yanchor"), "center")}
    xref, yref = note.get("xref", "x"), note.get("yref", "y")
    if xref == "paper" and yref == "paper":
        left, bottom, right, top = area
        fig.text(left + note.get("x", 0.5) * (right - left), bottom + note.get("y", 0.5) * (top - bottom), text,
                 **style)
    elif (xref, yref) in axes:
        axes[xref, yref].text(note.get("x", 0), note.get("y", 0), text, **style)


# ----- axes and traces --------------------------------------------------------------------------------------
def _axis(layout: dict[str, Any], ref: str) -> dict[str, Any]:
    """The layout of axis "x", "x2", "y3" … (layout keys xaxis, xaxis2, yaxis3)."""
    return layout.get(f"{ref[0]}axis{ref[1:]}") or {}


def _draw_traces(fig: Any, layout: dict[str, Any], traces: list[dict[str, Any]],
                 area: list[float]) -> tuple[dict[tuple[str, str], Any], dict[int, Any]]:
    """Every visible trace on the axes its xaxis/yaxis name, placed from the axis domains; returns the axes
    by (x, y) reference and the artist of each drawn trace by its index (for the legend)."""
    shown = {i: t for i, t in enumerate(traces) if t.get("visible", True) is True}
    unknown = {t.get("type", "scatter") for t in shown.values()} - {"scatter", "scattergl", "bar"}
    if unknown:
        raise ValueError(f"trace type {', '.join(sorted(unknown))} is not drawn")
    pairs = list(dict.fromkeys((t.get("xaxis", "x"), t.get("yaxis", "y")) for t in shown.values())) or [("x", "y")]
    axes, artists = {}, {}
    colorway = _look(layout, "colorway") or PLOTLY_COLORS
    for xref, yref in pairs:
        ax = axes[xref, yref] = _add_axes(fig, layout, xref, yref, area)
        on_axes = {i: t for i, t in shown.items() if (t.get("xaxis", "x"), t.get("yaxis", "y")) == (xref, yref)}
        categories = _categories(on_axes.values())
        bars = [i for i, t in on_axes.items() if t.get("type") == "bar"]
        slots, stack = _bar_slots(layout.get("barmode") or "group", len(bars))
        for i, trace in on_axes.items():
            color = colorway[i % len(colorway)]
            if trace.get("type") == "bar":
                artists[i] = _bar(ax, trace, color, categories, slots[bars.index(i)], stack)
            else:
                artists[i] = _scatter(ax, trace, color, categories)
        horizontal = any(on_axes[i].get("orientation") == "h" for i in bars)
        _finish_axes(ax, _axis(layout, xref), _axis(layout, yref), categories, horizontal)
    _match_ranges(axes, layout)
    return axes, artists


def _match_ranges(axes: dict[tuple[str, str], Any], layout: dict[str, Any]) -> None:
    """Axes that `matches` another (plotly's linked axes) show one range: the one the matched axis fixes, else
    the span of them all."""
    for k, which in enumerate("xy"):
        groups: dict[str, list[tuple[str, Any]]] = {}
        for refs, ax in axes.items():
            groups.setdefault(_axis(layout, refs[k]).get("matches") or refs[k], []).append((refs[k], ax))
        for target, members in groups.items():
            limits = [getattr(ax, f"get_{which}lim")() for _, ax in members]
            fixed = [lim for (ref, _), lim in zip(members, limits, strict=True) if ref == target]
            if len(members) < 2:
                continue
            if fixed and _axis(layout, target).get("range"):
                lo, hi = fixed[0]
            else:
                lo, hi = min(lim[0] for lim in limits), max(lim[1] for lim in limits)
            for _, ax in members:
                getattr(ax, f"set_{which}lim")(lo, hi)


def _add_axes(fig: Any, layout: dict[str, Any], xref: str, yref: str, area: list[float]) -> Any:
    xaxis, yaxis = _axis(layout, xref), _axis(layout, yref)
    (x0, x1), (y0, y1) = xaxis.get("domain") or (0, 1), yaxis.get("domain") or (0, 1)
    left, bottom, right, top = area
    ax = fig.add_axes((left + x0 * (right - left), bottom + y0 * (top - bottom),
                       (x1 - x0) * (right - left), (y1 - y0) * (top - bottom)))
    ax.set_facecolor(_color(_look(layout, "plot_bgcolor")) or "white")
    grid = _color(xaxis.get("gridcolor") or _look(layout, "xaxis", "gridcolor")) or "#ebf0f8"
    ax.grid(True, color=grid, linewidth=0.8)
    ax.set_axisbelow(True)
    for side, spine in ax.spines.items():
        spine.set_visible(side in ("left", "bottom"))
        spine.set_color(_color(xaxis.get("linecolor")) or "#c8d4e3")
    ax.tick_params(length=3)
    for axis, which in ((xaxis, "x"), (yaxis, "y")):
        if axis.get("type") == "log":
            getattr(ax, f"set_{which}scale")("log")
        label = _text(axis.get("title"))[0]
        if label:
            getattr(ax, f"set_{which}label")(label, fontsize=9, color="#2a3f5f")
    return ax


def _plain_log_labels(axis: Any, limits: tuple[float, float]) -> None:
    """Label a log axis as plotly does: plain numbers (0.5, 2, 10), also at 2 and 5 when it spans under three
    decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    if limits[0] > 0 and limits[1] / limits[0] < 1000:
        axis.set_minor_locator(LogLocator(subs=(2, 5)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def _categories(traces: Any) -> list[Any]:
    """The category axis values of these traces, in order of first appearance (none for a numeric x axis)."""
    xs = [v for t in traces for v in _values(_positions_of(t))]
    return list(dict.fromkeys(xs)) if any(isinstance(v, str) for v in xs) else []


def _positions_of(trace: dict[str, Any]) -> Any:
    """The values along the trace's position axis: x, or y for a horizontal bar."""
    return trace.get("y") if trace.get("orientation") == "h" else trace.get("x")


def _xy(trace: dict[str, Any], categories: list[Any]) -> tuple[list[float], list[float]]:
    """The trace's positions (category index on a category axis) and values, as numbers (None as NaN)."""
    values = _values(trace.get("x") if trace.get("orientation") == "h" else trace.get("y"))
    positions = _values(_positions_of(trace)) or list(range(len(values)))
    if categories:
        positions = [categories.index(p) for p in positions]
    return _numbers(positions), _numbers(values)


def _scatter(ax: Any, trace: dict[str, Any], color: str, categories: list[Any]) -> Any:
    xs, ys = _xy(trace, categories)
    mode = trace.get("mode") or ("lines+markers" if len(xs) < 20 else "lines")  # plotly's default
    line, marker = trace.get("line") or {}, trace.get("marker") or {}
    color = _color(line.get("color") if "lines" in mode else marker.get("color")) or _color(marker.get("color")) \
        or color
    symbol = str(marker.get("symbol", "circle")).removesuffix("-open")
    (artist,) = ax.plot(xs, ys, color=color, alpha=trace.get("opacity", 1),
                        linestyle=DASHES.get(line.get("dash") or "solid", "--") if "lines" in mode else "none",
                        linewidth=(line.get("width") or 2) * PT,
                        marker=SYMBOLS.get(symbol, "o") if "markers" in mode else None,
                        markersize=(marker.get("size") or 6) * PT * (1.4 if symbol == "star" else 1))
    if "text" in mode:
        for x, y, label in zip(xs, ys, _values(trace.get("text")), strict=False):
            ax.annotate(_text(label)[0], (x, y), xytext=(0, 6), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8, color="#2a3f5f")
    return artist


def _bar_slots(mode: str, count: int) -> tuple[list[tuple[float, float]], dict[float, float] | None]:
    """Each bar trace's (offset, width) within a category: side by side for barmode "group" (plotly's
    default), else full width; and the running totals bars stack on ("stack", "relative"), else None."""
    if mode == "group":
        width = 0.8 / max(count, 1)
        return [((k - (count - 1) / 2) * width, width) for k in range(count)], None
    return [(0.0, 0.8)] * count, ({} if mode in ("stack", "relative") else None)


def _bar(ax: Any, trace: dict[str, Any], color: str, categories: list[Any], slot: tuple[float, float],
         stack: dict[float, float] | None) -> Any:
    """One bar trace in its slot; stacked on the totals in `stack` (updated) when given."""
    positions, values = _xy(trace, categories)
    values = [0.0 if math.isnan(v) else v for v in values]
    base = None if stack is None else [stack.get(p, 0.0) for p in positions]
    if stack is not None:
        stack.update({p: b + v for p, b, v in zip(positions, base, values, strict=True)})
    offset, width = slot
    style = {"color": _color((trace.get("marker") or {}).get("color")) or color, "alpha": trace.get("opacity", 1)}
    at = [p + offset for p in positions]
    if trace.get("orientation") == "h":
        return ax.barh(at, values, height=width, left=base, **style)
    return ax.bar(at, values, width=width, bottom=base, **style)


def _finish_axes(ax: Any, xaxis: dict[str, Any], yaxis: dict[str, Any], categories: list[Any],
                 horizontal: bool) -> None:
    """Category tick labels (on y for horizontal bars), the ranges the layout gives, zero in view if asked."""
    if categories:
        (ax.yaxis if horizontal else ax.xaxis).set_ticks(range(len(categories)), [str(c) for c in categories])
        if not horizontal and sum(len(str(c)) + 2 for c in categories) * 6 > ax.get_window_extent().width:
            for label in ax.get_xticklabels():
                label.set(rotation=30, ha="right", rotation_mode="anchor")
    for axis, which in ((xaxis, "x"), (yaxis, "y")):
        limits = axis.get("range")
        if limits and None not in limits:
            lo, hi = limits
            getattr(ax, f"set_{which}lim")((10**lo, 10**hi) if axis.get("type") == "log" else (lo, hi))
        elif axis.get("rangemode") == "tozero" and axis.get("type") != "log":
            lo, hi = getattr(ax, f"get_{which}lim")()
            getattr(ax, f"set_{which}lim")(min(lo, 0), max(hi, 0))
        if axis.get("type") == "log":
            _plain_log_labels(getattr(ax, f"{which}axis"), getattr(ax, f"get_{which}lim")())
        if axis.get("autorange") == "reversed":
            getattr(ax, f"invert_{which}axis")()
    ax.tick_params(which="both", labelsize=8, colors="#506784")
