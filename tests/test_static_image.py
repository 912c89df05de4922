"""A chart saved in a notebook shows without a kernel or a network: nbtune's figures become real PNG images
(drawn by matplotlib here: no kaleido, no browser) beside their plotly JSON."""

from __future__ import annotations

import base64
import io
import math
import subprocess
import sys
from typing import Any

import pytest
from nbtune.widgets import charts
from nbtune.widgets.progress import TRACES, RunProgress

from nbtune import report, static_image
from nbtune.comparison import Table

PIL = pytest.importorskip("PIL.Image")


def training_figure() -> dict[str, Any]:
    """The dashboard's six-panel chart of a run folded from a few step and eval events."""
    progress = RunProgress()
    progress.apply("started", {"total_steps": 20})
    for step in range(1, 21):
        progress.apply("step", {"step": step, "loss": 3 * math.exp(-step / 8), "learning_rate": 2e-4 * (1 - step / 21),
                                "grad_norm": 1 + 0.3 * math.sin(step), "tokens_per_s": 900 + 10 * step,
                                "memory": {"rss": 2**30 * (1.2 + 0.01 * step)}})
        if step % 5 == 0:
            progress.apply("eval", {"step": step, "loss": 3 * math.exp(-step / 8) + 0.2, "perplexity": 10 - step / 3})
    return charts.training_figure(progress, "run 1234: finished", final=True)


def comparison_figures() -> dict[str, Any]:
    """The comparison's loss, memory and Pareto charts of three variants (one failed)."""
    curves = {name: ([{"step": s, "loss": (2 + i) / s} for s in range(1, 11)], [{"step": 10, "loss": 0.3 + i}])
              for i, name in enumerate(["full", "lora", "ia3"])}
    labels = {"full": "full", "lora": "lora", "ia3": "ia3 (failed)"}
    breakdowns = {"full": {"weights": 2**30, "optimizer": 2**31}, "lora": {"weights": 2**30, "optimizer": 2**25},
                  "ia3": {}}
    rows = [{"variant": name, "state": state, "error": error, "estimated_peak_bytes": peak,
             "measured_peak_bytes": None, "wall_time_s": 5.0, "eval_accuracy": accuracy, "final_eval_loss": 0.4}
            for name, state, error, peak, accuracy in (("full", "finished", None, 3 * 2**30, 0.9),
                                                       ("lora", "finished", None, 2**30, 0.8),
                                                       ("ia3", "failed", "boom", None, None))]
    return {"loss": report.loss_chart(curves, labels), "memory": report.memory_chart(breakdowns, labels),
            "pareto": report.pareto_chart(Table(rows, "eval_accuracy"))}


def image(data: bytes | None) -> Any:
    assert data is not None, "no PNG was drawn"
    picture = PIL.open(io.BytesIO(data))
    assert picture.format == "PNG"
    return picture.convert("RGB")


def rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))


def colors(picture: Any) -> set[tuple[int, int, int]]:
    return {c for _, c in picture.getcolors(picture.width * picture.height)}


def test_the_training_chart_draws_every_panel_as_a_png():
    picture = image(static_image.png(training_figure()))
    assert picture.size == (1000, 470)  # the layout's height, the default width
    drawn = colors(picture)
    assert len(drawn) > 20  # not a blank canvas
    shown = {t.name for t in TRACES} - {"eval accuracy"}  # the run has perplexity, so that is the Eval panel
    assert {t.name for t in TRACES if rgb(t.color) in drawn} == shown  # each trace's line is in the picture


@pytest.mark.parametrize(("name", "color"), [("loss", "#636efa"), ("memory", "#636efa"), ("pareto", "#d62728")])
def test_the_comparison_charts_draw_as_pngs(name, color):
    picture = image(static_image.png(comparison_figures()[name]))
    assert picture.size[0] > 0 and len(colors(picture)) > 20
    assert rgb(color) in colors(picture)  # the first variant's line or bar; the Pareto front's red stars


def test_stacked_bars_stand_on_each_other():
    """The memory chart stacks categories (barmode "stack"): one column holds both colours, one above the other."""
    figure = comparison_figures()["memory"]
    picture = image(static_image.png(figure))
    weights, optimizer = rgb("#636efa"), rgb("#EF553B")  # plotly's first two colours, in trace order
    column = next(x for x in range(picture.width) if picture.getpixel((x, picture.height - 100)) == weights)
    pixels = [picture.getpixel((column, y)) for y in range(picture.height)]
    assert optimizer in pixels and pixels.index(optimizer) < pixels.index(weights)  # optimizer above weights


def test_a_figure_shows_as_plotly_json_a_png_and_a_line_of_text():
    figure = comparison_figures()["pareto"]
    bundle = static_image.figure_bundle(figure)
    assert [t.get("name") for t in bundle[static_image.PLOTLY_MIME]["data"]][:2] == ["Pareto front (non-dominated)",
                                                                                 "dominated"]
    image(base64.b64decode(bundle["image/png"]))
    assert bundle["text/plain"].startswith("plotly chart: eval_accuracy (higher is better)")


def test_a_chart_it_cannot_draw_keeps_its_plotly_json_only(caplog):
    import plotly.graph_objects as go

    pie = go.Figure(go.Pie(labels=["a", "b"], values=[1, 2]))
    with caplog.at_level("INFO", logger="nbtune"):
        bundle = static_image.figure_bundle(pie)
    assert "image/png" not in bundle and bundle[static_image.PLOTLY_MIME]["data"][0]["type"] == "pie"
    assert "trace type pie is not drawn" in caplog.text


def test_drawing_leaves_the_users_matplotlib_backend_alone():
    code = ("import sys\nfrom nbtune import static_image\n"
            "assert static_image.png({'data': [{'type': 'scatter', 'x': [1, 2], 'y': [3, 4]}], 'layout': {}})\n"
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_comparison_shows_each_chart_with_a_png(monkeypatch, tmp_path):
    import IPython.display

    import nbtune

    shown: list[Any] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj))
    nbtune.compare(nbtune.TuneConfig(), methods=["lora", "ia3"], store=tmp_path, train=False).show()
    bundles = [obj for obj in shown if isinstance(obj, dict)]
    assert len(shown) == 5 and len(bundles) == 4  # the table, then the four charts
    assert all(static_image.PLOTLY_MIME in b and "image/png" in b for b in bundles)
