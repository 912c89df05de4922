"""A notebook executed headless (nbclient) keeps what a reader without a kernel needs: the final chart with every
point (plotly JSON, plus a PNG where kaleido can render) and the summary table, in a file under 2 MB; and
nothing else: no stale progress bar, Stop button or live chart left below the record (ipywidgets 7 and 8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CONFIG = """\
training: {max_steps: 8, log_every: 1, eval_every: 4, micro_batch_size: 4}
data: {max_samples: 48, max_eval_samples: 16}
"""


def record_parts(outputs: list) -> list[str]:  # noqa: ANN001
    """What each output of a cell is: status, chart, summary, widget (a live view) or other."""
    def kind(output) -> str:  # noqa: ANN001
        data = output.get("data", {})
        if WIDGET_VIEW in data:
            return "widget"
        if PLOTLY in data:
            return "chart"
        text = data.get("text/html", "")
        return "status" if "nbtune-status" in text else "summary" if "nbtune-summary" in text else "other"
    return [kind(o) for o in outputs]


def make_notebook(store: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext nbtune"),
        nbformat.v4.new_code_cell(f"%%nbtune --store {store} --wait --name run\n{CONFIG}"),
        nbformat.v4.new_code_cell("run.status"),
        # The builder's Launch path (its own store, so that it trains live): its dashboard fills the outputs
        # under the builder.
        nbformat.v4.new_code_cell("from nbtune.widgets import Builder\nfrom nbtune import TuneConfig\n"
                                  f"b = Builder(TuneConfig.from_yaml({CONFIG!r}), store={str(store) + '-builder'!r})\nb"),
        nbformat.v4.new_code_cell("b.launch()\nb.dashboard.wait(300)\nb.run.status"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_headless_notebook_keeps_the_full_chart_and_the_summary(tmp_path: Path):
    nb = make_notebook(tmp_path / "store")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.km_kwargs = {}
    client.execute()
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)

    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "'finished'"
    outputs = nb.cells[1].outputs
    # Exactly the record: under ipywidgets 7 a live view updated with a widget object used to stay below it.
    assert record_parts(outputs) == ["status", "chart", "summary"]
    # the builder, its static copy (nbtune-static-builder, hidden where the widget renders), its run
    assert record_parts(nb.cells[3].outputs) == ["widget", "other", "status", "chart", "summary"]
    assert "nbtune-static-builder" in nb.cells[3].outputs[1]["data"]["text/html"]
    launched = nb.cells[4].outputs  # and in the cell that launched: its result only, no stray live view
    assert [o["output_type"] for o in launched] == ["execute_result"]
    assert launched[0]["data"]["text/plain"] == "'finished'"
    charts = [o for o in outputs if PLOTLY in o.get("data", {})]
    assert len(charts) == 1, [list(o.get("data", {})) for o in outputs]
    figure = charts[0]["data"][PLOTLY]
    if isinstance(figure, str):
        figure = json.loads(figure)
    traces = {t["name"]: t for t in figure["data"]}

    run_dir = next((tmp_path / "store" / "runs").iterdir())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e["data"] for e in events if e["kind"] == "step"]
    evals = [e["data"] for e in events if e["kind"] == "eval" and e["data"].get("loss") is not None]
    assert traces["train loss"]["x"] == [s["step"] for s in steps] and len(steps) == 8  # every point
    assert traces["train loss"]["y"] == pytest.approx([s["loss"] for s in steps], rel=1e-5)
    assert len(traces["eval loss"]["x"]) == len(evals) >= 2

    summaries = [o for o in outputs if "nbtune-summary" in o.get("data", {}).get("text/html", "")]
    assert len(summaries) == 1 and "final eval loss" in summaries[0]["data"]["text/html"]
    states = [o for o in outputs if "nbtune-status" in o.get("data", {}).get("text/html", "")]
    assert states and "finished" in states[0]["data"]["text/html"]

    static = charts[0]["data"]
    assert "image/png" in static or "text/html" in static  # a fallback for renderers without plotly JSON
    assert path.stat().st_size < 2 * 2**20

    # nbviewer-style rendering (nbconvert's HTML exporter, no kernel): the chart is there as an image or HTML.
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(path))
    assert "data:image/png;base64" in body or "plotly" in body.lower()
    assert "final eval loss" in body
    if "image/png" in static:
        print(f"PNG fallback: {len(static['image/png']) * 3 // 4 // 1024} KiB", file=sys.stderr)
