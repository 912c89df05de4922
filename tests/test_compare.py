"""nbtune.compare: methods side by side on the same data and budget, served from the store, with a report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

import nbtune
from nbtune import training
from nbtune.comparison import Comparison, pareto_front
from nbtune.methods import registry

METHODS = ["lora", "bitfit", "prompt-tuning"]


def _rows(n: int = 48) -> list[dict]:
    return [{"text": f"item {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


@pytest.fixture(scope="module")
def base() -> nbtune.TuneConfig:
    return nbtune.TuneConfig(
        model={"task": "seq-cls"},
        data={"source": _rows(), "label_column": "label", "eval_split": 0.25},
        training={"max_steps": 3, "micro_batch_size": 8, "eval_every": 3, "log_every": 1},
    )


@pytest.fixture(scope="module")
def trained(base, store) -> tuple[Comparison, str]:
    # AdaLoRA's default schedule (tinit 10 + tfinal 20) cannot fit 3 steps: a failing variant must not stop the rest.
    comparison = nbtune.compare(base, methods=METHODS, variants={"broken": {"method": "adalora"}}, store=store,
                                progress=False)
    return comparison, str(store.root)


def test_table_has_one_row_per_variant_with_real_numbers(trained):
    comparison, _ = trained
    table = comparison.to_pandas()
    assert list(table.index) == [*METHODS, "broken"]
    done = table.loc[METHODS]
    assert (done["state"] == "finished").all()
    assert (done["trainable_params"] > 0).all() and (done["trainable_params"] < done["total_params"]).all()
    assert ((done["trainable_percent"] > 0) & (done["trainable_percent"] < 100)).all()
    assert (done["wall_time_s"] > 0).all() and (done["tokens_per_s"] > 0).all()
    assert (done["artifact_bytes"] > 0).all()
    for column in ("final_train_loss", "best_train_loss", "final_eval_loss", "best_eval_loss"):
        assert done[column].map(math.isfinite).all(), column
    assert (done["best_train_loss"] <= done["final_train_loss"]).all()
    assert done["eval_accuracy"].between(0, 1).all()
    # every method trains at its own registry learning rate, shown in the table
    for method in METHODS:
        assert table.loc[method, "learning_rate"] == registry.get(method).learning_rate
    assert table.loc["broken", "state"] == "failed"
    assert "tinit" in table.loc["broken", "error"]


def test_fairness_is_stated_and_the_same_budget_was_used(trained):
    comparison, _ = trained
    table = comparison.to_pandas().loc[METHODS]
    assert table["tokens_seen"].nunique() == 1 and table["steps"].eq(3).all()
    text = " ".join(comparison.fairness())
    assert "seed 0" in text and "3 steps × 8 examples = 24 examples" in text
    assert f"{int(table['tokens_seen'].iloc[0])} tokens seen" in text
    assert "registry default" in text
    assert "12 held-out rows" in text


def test_reopening_from_the_store_trains_nothing_and_imports_no_torch(trained, base):
    comparison, store = trained
    comparison.memory_chart()  # the memory estimates are kept in the store beside the runs
    script = f"""
import json, sys
import nbtune
base = nbtune.TuneConfig.from_json(sys.stdin.read())
c = nbtune.Comparison.from_store(base, methods={METHODS!r}, store={store!r})
rows = c.rows()
c.to_html()
assert "torch" not in sys.modules, "re-opening imported torch"
print(json.dumps({{r["variant"]: [r["state"], r["run_id"], r["eval_accuracy"]] for r in rows}}))
"""
    out = subprocess.run([sys.executable, "-c", script], input=base.to_json(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    reopened = json.loads(out.stdout.strip().splitlines()[-1])
    original = comparison.to_pandas()
    for method in METHODS:
        assert reopened[method] == ["finished", original.loc[method, "run_id"], original.loc[method, "eval_accuracy"]]


def test_adding_a_variant_trains_only_the_new_one(trained, base, monkeypatch):
    _, store = trained
    trained_methods = []
    execute = training.execute

    def counting_execute(config, *args, **kwargs):
        trained_methods.append(config.method.name)
        return execute(config, *args, **kwargs)

    monkeypatch.setattr(training, "execute", counting_execute)
    comparison = Comparison.from_store(base, methods=METHODS, store=store)
    assert trained_methods == []
    assert comparison.served_from_store == set(METHODS)
    comparison.add(variants={"ia3": "ia3"}, progress=False)
    assert trained_methods == ["ia3"]
    table = comparison.to_pandas()
    assert list(table.index) == [*METHODS, "ia3"]
    assert table.loc["ia3", "state"] == "finished" and not table.loc["ia3", "served_from_store"]


def test_missing_variants_show_without_training(base, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "execute", lambda *a, **k: pytest.fail("training was started"))
    comparison = nbtune.compare(base, methods=["lora", "ia3"], store=tmp_path, train=False)
    table = comparison.to_pandas()
    assert list(table["state"]) == ["missing", "missing"]
    assert table["run_id"].isna().all()
    assert "missing" in comparison.to_html()


def test_best_picks_the_right_run(trained):
    comparison, _ = trained
    table = comparison.to_pandas().loc[METHODS]
    assert comparison.best(by="trainable_params").id == table.loc[table["trainable_params"].idxmin(), "run_id"]
    best = comparison.best()
    assert best.summary.final_eval_accuracy == table["eval_accuracy"].max()
    assert comparison.best(by="tokens_per_s").id == table.loc[table["tokens_per_s"].idxmax(), "run_id"]


def test_from_runs_names_variants_by_method(trained):
    comparison, store = trained
    runs = [comparison.runs["lora"].id, comparison.runs["bitfit"].id, comparison.runs["lora"]]
    again = Comparison.from_runs(runs, store=store)
    assert list(again.runs) == ["lora", "bitfit", "lora-2"]
    assert again.to_pandas().loc["bitfit", "eval_accuracy"] == comparison.to_pandas().loc["bitfit", "eval_accuracy"]


def test_pareto_front_marks_non_dominated_points():
    # (cost, quality): b dominates c (cheaper and better); a is cheapest; d is best; e ties with d exactly
    costs = [1.0, 2.0, 3.0, 4.0, 4.0]
    quality = [0.5, 0.7, 0.6, 0.9, 0.9]
    assert pareto_front(costs, quality) == [True, True, False, True, True]
    # lower is better (eval loss): the same points with the quality mirrored
    assert pareto_front(costs, [-q for q in quality], higher_is_better=False) == [True, True, False, True, True]
    assert pareto_front([1, 1], [0.5, 0.4]) == [True, False]  # same cost, worse quality: dominated


def test_pareto_chart_marks_the_front_of_a_hand_made_table(trained, monkeypatch):
    comparison, _ = trained
    hand_made = [
        {"variant": "cheap", "state": "finished", "wall_time_s": 1.0, "eval_accuracy": 0.5},
        {"variant": "dominated", "state": "finished", "wall_time_s": 3.0, "eval_accuracy": 0.4},
        {"variant": "accurate", "state": "finished", "wall_time_s": 5.0, "eval_accuracy": 0.9},
        {"variant": "failed", "state": "failed", "wall_time_s": 0.5, "eval_accuracy": None},
    ]
    monkeypatch.setattr(comparison, "rows", lambda: hand_made)
    assert comparison.pareto("time") == {"cheap": True, "dominated": False, "accurate": True}
    fig = comparison.pareto_chart("time")
    marked = {t.name: list(t.text) for t in fig.data if t.text is not None}
    assert sorted(marked["Pareto front (non-dominated)"]) == ["accurate", "cheap"]
    assert marked["dominated"] == ["dominated"]


def test_loss_chart_axes_smoothing_and_log_scale(trained):
    comparison, _ = trained
    run = comparison.runs["lora"]
    steps = run.metrics[run.metrics["kind"] == "step"]
    raw = comparison.loss_chart(x="tokens", smoothing=0.0, log_y=True)
    train = next(t for t in raw.data if t.name == "lora")
    assert list(train.x) == list(steps["tokens_seen"]) and list(train.y) == pytest.approx(list(steps["loss"]))
    assert raw.layout.yaxis.type == "log"
    smooth = comparison.loss_chart(x="epoch", smoothing=0.9, log_y=False)
    smoothed = next(t for t in smooth.data if t.name == "lora")
    assert smoothed.y[0] == pytest.approx(steps["loss"].iloc[0])
    assert smoothed.y[-1] == pytest.approx(0.9 * (0.9 * steps["loss"].iloc[0] + 0.1 * steps["loss"].iloc[1])
                                           + 0.1 * steps["loss"].iloc[2])
    assert smooth.layout.yaxis.type == "linear" and list(smoothed.x) == pytest.approx(list(steps["epoch"]))
    assert any(t.name == "lora (eval)" for t in smooth.data)
    with pytest.raises(ValueError, match="x must be one of step, epoch, tokens"):
        comparison.loss_chart(x="time")


def test_to_html_is_a_self_contained_report(trained, tmp_path):
    comparison, _ = trained
    path = tmp_path / "report.html"
    page = comparison.to_html(path)
    assert path.read_text(encoding="utf-8") == page
    assert not re.search(r"<script[^>]+src=", page), "the report must not load scripts from elsewhere"
    assert len(page) > 1_000_000 and "plotly.js" in page  # plotly.js itself is inlined
    assert page.count("Plotly.newPlot") == 3  # loss curves, memory breakdown, Pareto chart
    assert '"type":"scatter"' in page.replace(" ", "") and "lora (eval)" in page
    table = re.search(r'<table class="nbtune-comparison">.*?</table>', page, re.S).group(0)
    assert table.count("<tr") == 1 + 4  # header + one row per variant
    assert "Fairness" in page and "seed 0" in page


def test_a_report_computes_the_table_once(trained, monkeypatch):
    # every row reads its run's summary from disk and may estimate memory: a store of many runs re-opens fast
    # only if the page, its table, the Pareto marks and the charts all draw from one computation
    comparison, _ = trained
    rows = comparison.rows
    calls = []
    monkeypatch.setattr(comparison, "rows", lambda: calls.append(1) or rows())
    comparison.to_html()
    assert len(calls) == 1
    comparison._repr_html_()
    assert len(calls) == 2


def test_memory_chart_stacks_the_estimate_of_every_variant(trained):
    comparison, _ = trained
    fig = comparison.memory_chart()
    table = comparison.to_pandas()
    assert {t.name for t in fig.data} >= {"frozen weights", "gradients"}  # the estimator's categories, by label
    for i, label in enumerate(fig.data[0].x):
        name = label.removesuffix(" (failed)")
        stacked = sum(t.y[i] for t in fig.data) * 2**20
        assert stacked == pytest.approx(table.loc[name, "estimated_peak_bytes"], rel=1e-6), name
    assert list(fig.data[0].x) == [*METHODS, "broken (failed)"]  # a failed variant says so on the chart


def test_notebook_display_is_static_html_with_the_table(trained):
    comparison, _ = trained
    bundle = comparison._repr_mimebundle_()
    assert "nbtune-comparison" in bundle["text/html"] and "prompt-tuning" in bundle["text/plain"]


def test_language_modelling_reports_perplexity(tmp_path):
    rows = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(24)]
    base = nbtune.TuneConfig(data={"source": rows, "target_column": "completion", "prompt_template": "{prompt}",
                                   "eval_split": 0.25},
                             training={"max_steps": 2, "micro_batch_size": 8, "eval_every": 2, "log_every": 1})
    comparison = nbtune.compare(base, methods=["bitfit"], store=tmp_path, progress=False)
    row = comparison.to_pandas().loc["bitfit"]
    assert row["state"] == "finished"
    assert row["eval_perplexity"] == pytest.approx(math.exp(row["final_eval_loss"]))
    assert comparison.quality == "final_eval_loss" and "eval_accuracy" not in comparison.to_pandas()
