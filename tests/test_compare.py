"""nbtune.compare: methods side by side on the same data and budget, served from the store, with a report."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys

import pytest

import nbtune
from nbtune import comparison as comparison_module
from nbtune import report, training
from nbtune.comparison import Comparison, Table, Target, pareto_front
from nbtune.methods import registry
from nbtune.projection import Projection

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
    assert comparison.best(by="trainable_params").run.id == table.loc[table["trainable_params"].idxmin(), "run_id"]
    assert comparison.best(by="tokens_per_s").run.id == table.loc[table["tokens_per_s"].idxmax(), "run_id"]
    # one seed has no spread: only the variants with exactly the top accuracy share the best
    best = comparison.best()
    top = table["eval_accuracy"].max()
    assert set(best.variants) == set(table.index[table["eval_accuracy"] == top])
    assert best.runs[0].summary.final_eval_accuracy == top


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
    assert page.count("Plotly.newPlot") == 4  # loss curves, memory breakdown, quality vs trainable %, Pareto
    assert '"type":"scatter"' in page.replace(" ", "") and "lora (eval)" in page
    table = re.search(r'<table class="nbtune-comparison">.*?</table>', page, re.S).group(0)
    assert table.count("<tr") == 1 + 4  # header + one row per variant
    assert "Fairness" in page and "seed 0" in page
    assert page.index('class="nbtune-recommendation"') < page.index('class="nbtune-comparison"')


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


# ----- seeds, ties, the recommendation and the table's layout ---------------------------------------------
def _accuracy_row(name: str, accuracy: float, std: float | None, trainable: float, **extra) -> dict:
    """A finished variant's row as the table holds it: its mean accuracy over seeds, the spread, its share."""
    return {"variant": name, "method": name, "state": "finished", "eval_accuracy": accuracy, "quality_std": std,
            "seeds": 3 if std is not None else 1, "trainable_percent": trainable, "final_eval_loss": 1 - accuracy,
            "estimated_peak_bytes": 700 * 2**20, "wall_time_s": 5.0, "error": None, **extra}


def _row_html(page: str, variant: str) -> str:
    """The main table's row of a variant."""
    main = re.search(r'<table class="nbtune-comparison">.*?</table>', page, re.S).group(0)
    return re.search(rf"<tr[^>]*><td>{re.escape(variant)}( ★)?</td>.*?</tr>", main, re.S).group(0)


def test_seeds_train_every_variant_n_times_and_report_mean_and_spread(trained, base, monkeypatch):
    _, store = trained
    trained_seeds = []
    execute = training.execute

    def counting_execute(config, *args, **kwargs):
        trained_seeds.append((config.method.name, config.training.seed))
        return execute(config, *args, **kwargs)

    monkeypatch.setattr(training, "execute", counting_execute)
    comparison = nbtune.compare(base, methods=["bitfit"], store=store, seeds=3, progress=False)
    assert trained_seeds == [("bitfit", 1), ("bitfit", 2)]  # seed 0 was in the store already: only new seeds train
    runs = comparison.seed_runs["bitfit"]
    assert [r.config.training.seed for r in runs] == [0, 1, 2] and len({r.id for r in runs}) == 3
    accuracies = [r.summary.final_eval_accuracy for r in runs]
    row = comparison.to_pandas().loc["bitfit"]
    assert row["seeds"] == 3 and row["eval_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert row["quality_std"] == pytest.approx(statistics.stdev(accuracies))
    assert row["wall_time_s"] == pytest.approx(statistics.fmean(r.summary.wall_time_s for r in runs))
    cell = f"{row['eval_accuracy']:.4f} ± {row['quality_std']:.4f} (3 seeds)"
    assert cell in _row_html(comparison.to_html(), "bitfit")
    again = Comparison.from_store(base, methods=["bitfit"], store=store, seeds=3)
    assert trained_seeds == [("bitfit", 1), ("bitfit", 2)] and again.served_from_store == {"bitfit"}


def test_one_seed_says_it_has_no_spread(trained):
    comparison, _ = trained
    row = _row_html(comparison.table_html(), "lora")
    assert "(1 seed: no spread)" in row
    assert "With 1 seed there is no spread" in comparison.recommendation()


def test_overlapping_spreads_are_a_tie_and_best_picks_none(trained, monkeypatch):
    comparison, _ = trained
    rows = [_accuracy_row("lora", 0.80, 0.03, 0.9), _accuracy_row("bitfit", 0.78, 0.01, 0.05),
            _accuracy_row("prompt-tuning", 0.60, 0.01, 0.001)]
    monkeypatch.setattr(comparison, "rows", lambda: rows)
    best = comparison.best()
    assert best.tied and best.variants == ["lora", "bitfit"]  # 0.02 apart, within lora's spread of 0.03
    with pytest.raises(ValueError, match="no single best by eval_accuracy: lora, bitfit tie"):
        _ = best.run
    assert "tie for the best eval accuracy" in str(best)
    rows[0] = _accuracy_row("lora", 0.90, 0.01, 0.9)  # now 0.12 ahead: beyond any spread
    decided = comparison.best()
    assert not decided.tied and decided.run is comparison.runs["lora"]
    assert str(decided).startswith("lora: eval accuracy 0.9000 ± 0.0100 (3 seeds), ahead of bitfit")


def test_a_tie_recommends_the_cheapest_of_the_tied_group_with_figures_from_the_table():
    table = Table([_accuracy_row("full", 0.95, 0.02, 100.0), _accuracy_row("lora", 0.94, 0.01, 0.9),
                   _accuracy_row("bitfit", 0.80, 0.01, 0.05), _accuracy_row("ia3", 0.80, 0.20, 0.02)],
                  "eval_accuracy")
    text = report.recommendation_text(table)
    assert "full, lora and ia3 tie for the best eval accuracy" in text  # ia3's spread is wide enough to reach
    chosen = re.search(r"Use (\S+?),? ", text).group(1)
    # bitfit and ia3 are cheaper but 15 points worse on average: outside the near-best margin
    assert chosen == "lora" and "the cheapest of the tied methods within 2 accuracy points" in text
    page = report.table_html(table)
    for figure in re.findall(r"\d\.\d{4} ± \d\.\d{4} \(3 seeds\)", text):
        assert any(figure in _row_html(page, name) for name in ("full", "lora", "ia3")), figure
    assert "0.9% of the parameters trained" in text and "<td>0.9%</td>" in _row_html(page, "lora")


def test_the_cheapest_within_the_margin_is_recommended_over_a_slightly_better_one():
    table = Table([_accuracy_row("lora", 0.950, 0.005, 0.9), _accuracy_row("ia3", 0.935, 0.004, 0.02),
                   _accuracy_row("prompt-tuning", 0.70, 0.01, 0.001)], "eval_accuracy")
    text = report.recommendation_text(table)
    assert "Best eval accuracy among those that fit: lora with 0.9500 ± 0.0050 (3 seeds)" in text
    assert re.search(r"Use ia3: the cheapest within 2 accuracy points of the best", text)
    row = _row_html(report.table_html(table), "ia3")
    assert "0.9350 ± 0.0040 (3 seeds)" in text and "0.9350 ± 0.0040 (3 seeds)" in row
    assert "0.02% of the parameters trained" in text and "<td>0.02%</td>" in row


def test_a_projection_to_the_target_decides_fit_memory_and_the_charts(trained, base, monkeypatch):
    _, store = trained
    gib = 2**30
    peaks = {"lora": 9 * gib, "bitfit": 30 * gib, "prompt-tuning": 8 * gib}
    asked = []

    def fake_project_all(configs, target_model, gpu):
        asked.append((sorted(configs), target_model, gpu))
        return {n: Projection(target_model, gpu, peak_bytes=peaks[n], fits=peaks[n] < 15 * gib, step_time_s=0.5,
                              tokens_per_s=900.0) for n in configs}

    monkeypatch.setattr(comparison_module, "_project_all", fake_project_all)
    comparison = Comparison.from_store(base, methods=METHODS, store=store, target_model="Qwen/Qwen2.5-7B", gpu="t4")
    table = comparison.to_pandas()
    assert asked == [(sorted(METHODS), "Qwen/Qwen2.5-7B", "t4")]
    assert list(table["fits"]) == [True, False, True]
    text = comparison.recommendation()
    assert text.startswith("For Qwen/Qwen2.5-7B on NVIDIA T4 16 GB") and "2 of 3 finished methods fit" in text
    assert "(not: bitfit needs 30.00 GiB)" in text
    chosen = re.search(r"Use (\S+?)[:,] ", text).group(1)
    assert chosen in {"lora", "prompt-tuning"}  # bitfit does not fit the T4
    assert f"{peaks[chosen] / gib:.2f} GiB projected peak" in text
    assert f"<td>{peaks[chosen] / gib:.2f} GiB</td>" in _row_html(comparison.table_html(), chosen)
    memory = comparison.memory_chart()
    assert list(memory.data[0].y) == [9, 30, 8] and "Qwen/Qwen2.5-7B on NVIDIA T4" in memory.layout.title.text
    assert comparison.table().cost_column("memory") == "projected_peak_bytes"
    again = Comparison.from_store(base, methods=METHODS, store=store, target_model="Qwen/Qwen2.5-7B", gpu="t4")
    assert list(again.to_pandas()["fits"]) == [True, False, True] and len(asked) == 1  # kept in the store


def test_failed_variants_keep_their_row_with_the_reason_and_are_named_in_every_chart(trained):
    comparison, _ = trained
    reason = comparison.failures()["broken"]
    row = _row_html(comparison.table_html(), "broken")
    assert "failed: " + reason[:40] in row  # the state cell gives the reason, not a dash
    figures = comparison.figures()
    assert set(figures) == {"loss", "memory", "quality", "pareto"}
    for name, fig in figures.items():
        notes = " ".join(a.text for a in fig.layout.annotations)
        assert "broken (failed): " + reason[:30] in notes, name
    assert "Not considered: broken (failed)" in comparison.recommendation()


def test_the_deciding_columns_come_first_and_the_rest_fold_into_details(trained):
    comparison, _ = trained
    page = comparison.table_html()
    main, details = re.findall(r"<table class=\"(nbtune-\w+)\"><thead><tr>(.*?)</tr>", page)
    headers = re.findall(r"<th>(.*?)</th>", main[1])
    assert main[0] == "nbtune-comparison" and details[0] == "nbtune-details"
    assert headers == ["variant", "held-out accuracy (mean ± std)", "trainable %", "estimated peak memory",
                       "wall time", "state"]
    assert page.index("<details><summary>details</summary>") < page.index('class="nbtune-details"')
    folded = re.findall(r"<th>(.*?)</th>", details[1])
    assert {"final eval loss", "learning rate", "artifact size"} <= set(folded) and "wall time" not in folded


def test_quality_chart_plots_trainable_share_on_a_log_axis(trained):
    comparison, _ = trained
    fig = comparison.quality_chart()
    table = comparison.to_pandas()
    points = {name: (x, y) for trace in fig.data for name, x, y in zip(trace.text, trace.x, trace.y, strict=True)}
    assert fig.layout.xaxis.type == "log" and set(points) == set(METHODS)
    starred = next(t for t in fig.data if t.name == "recommended")
    assert list(starred.text) == [re.search(r"Use (\S+?)[:,] ", comparison.recommendation()).group(1)]
    for name, (x, y) in points.items():
        assert x == table.loc[name, "trainable_percent"] and y == table.loc[name, "eval_accuracy"]


def test_the_tie_rule_is_the_larger_spread():
    table = Table([], "eval_accuracy", Target("t4", "NVIDIA T4 16 GB", 16 * 2**30))
    a, b = {"eval_accuracy": 0.80, "quality_std": 0.01}, {"eval_accuracy": 0.77, "quality_std": 0.03}
    assert table.ties(a, b, "eval_accuracy")  # 0.03 apart: within b's spread
    assert not table.ties(a, {"eval_accuracy": 0.76, "quality_std": 0.03}, "eval_accuracy")
    assert table.ties({"eval_accuracy": 1.0}, {"eval_accuracy": 1.0}, "eval_accuracy")  # equal, no spread


def test_a_method_with_no_projection_to_the_target_is_not_recommended_for_it():
    gib = 2**30
    target = Target("h100", "NVIDIA H100 80 GB", 79 * gib, "meta-llama/Llama-3.1-8B")
    table = Table([_accuracy_row("lora", 0.90, 0.01, 1.9, fits=True, projected_peak_bytes=20 * gib),
                   _accuracy_row("bitfit", 0.91, 0.01, 0.3, fits=None, projected_peak_bytes=None,
                                 projection_error="method bitfit needs bias parameters")],
                  "eval_accuracy", target)
    text = report.recommendation_text(table)
    assert "1 of 2 finished methods fit" in text
    assert "cannot tell, no projection: bitfit: method bitfit needs bias parameters" in text
    assert table.recommend().variant == "lora" and "Use lora" in text


def test_predicted_labels_side_by_side_are_kept_and_shown_in_the_report(trained, monkeypatch):
    comparison, _ = trained
    texts = ["item 101 is good", "item 102 is bad", "item 103 is good"]
    answers = comparison.generations(texts, expected=["pos", "neg", "pos"])
    finished = [name for name, run in comparison.runs.items() if run is not None and run.status == "finished"]
    assert [row["prompt"] for row in answers.rows] == texts and answers.columns == finished  # no base column
    assert all(label in ("pos", "neg") for column in answers.columns for label in answers.answers[column])
    page = comparison.to_html()
    assert "Predicted labels" in page and "item 102 is bad" in page

    from nbtune import generation
    monkeypatch.setattr(generation, "_run_answers", lambda *a, **k: pytest.fail("a model was loaded again"))
    again = comparison.generations(texts, expected=["pos", "neg", "pos"])
    assert again.answers == answers.answers  # served from the store


# ----- variants of different stages (sft, dpo, ...) -------------------------------------------------------
SUMS = [{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}"} for i in range(16)]
CHAT_PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
               "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
               "rejected": [{"role": "assistant", "content": "I do not know."}]} for i in range(16)]
STAGED = {"sft-lora": {"method": "lora"},
          "dpo-lora": {"method": "lora", "training.stage": "dpo", "data.source": CHAT_PAIRS}}


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Comparison, nbtune.TuneConfig, str]:
    training = {"max_steps": 2, "micro_batch_size": 4, "eval_every": None, "log_every": 1}
    base = nbtune.TuneConfig(data={"source": SUMS, "eval_split": 0.25}, training=training)
    store = str(tmp_path_factory.mktemp("stages"))
    return nbtune.compare(base, variants=STAGED, store=store, progress=False), base, store


def test_variants_of_different_stages_each_have_a_row_with_the_stage_and_its_metrics(staged):
    comparison, _, _ = staged
    table = comparison.to_pandas()
    assert list(table["state"]) == ["finished", "finished"]
    assert table.loc["sft-lora", "stage"] == "sft" and table.loc["dpo-lora", "stage"] == "dpo"
    dpo, sft = table.loc["dpo-lora"], table.loc["sft-lora"]
    for metric in ("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"):
        assert math.isfinite(dpo[metric]) and math.isnan(sft[metric]), metric  # blank for the other stage
    assert 0 <= dpo["reward_accuracy"] <= 1 and 0 <= dpo["eval_accuracy"] <= 1  # its preference accuracy
    assert math.isnan(sft["eval_accuracy"]) and math.isnan(dpo["eval_perplexity"])  # a DPO loss is no CE
    assert sft["eval_perplexity"] == pytest.approx(math.exp(sft["final_eval_loss"]))
    page = comparison.table_html()
    main = re.search(r'<table class="nbtune-comparison">.*?</table>', page, re.S).group(0)
    headers = re.findall(r"<th>(.*?)</th>", main)
    assert headers[:3] == ["variant", "stage", "quality within its stage (mean ± std)"]
    assert {"reward margin", "reward accuracy"} <= set(headers)
    assert "dpo: held-out preference accuracy: the chosen answer scored above the rejected one" in page
    assert f"<td>{dpo['eval_accuracy']:.4f} (1 seed: no spread)</td>" in _row_html(page, "dpo-lora")
    assert f"<td>{sft['final_eval_loss']:.4f} (1 seed: no spread)</td>" in _row_html(page, "sft-lora")
    report_page = comparison.to_html()
    assert "Stages differ (sft-lora: Supervised fine-tuning (SFT); dpo-lora: Direct preference" in report_page
    assert "Not the same data" in report_page  # each stage trained on rows of its own format
    assert {"quality (sft)", "quality (dpo)", "pareto (sft)", "pareto (dpo)"} <= set(comparison.figures())


def test_comparing_across_stages_again_trains_nothing(staged, monkeypatch):
    first, base, store = staged
    monkeypatch.setattr(training, "execute", lambda *a, **k: pytest.fail("training was started"))
    again = nbtune.compare(base, variants=STAGED, store=store, progress=False)
    assert again.served_from_store == set(STAGED)
    assert list(again.to_pandas()["run_id"]) == list(first.to_pandas()["run_id"])


def test_the_recommendation_and_best_rank_within_each_stage_never_across(staged, monkeypatch):
    comparison, _, _ = staged
    # a DPO loss (here 0.30) is far below any cross-entropy: ranked together, every DPO variant would "win"
    rows = [{**_accuracy_row("sft-lora", 0.0, None, 0.9), "stage": "sft", "final_eval_loss": 1.6,
             "eval_accuracy": None},
            {**_accuracy_row("sft-ia3", 0.0, None, 5.0), "stage": "sft", "final_eval_loss": 2.1,
             "eval_accuracy": None},
            {**_accuracy_row("dpo-lora", 0.95, None, 0.9), "stage": "dpo", "final_eval_loss": 0.30},
            {**_accuracy_row("dpo-ia3", 0.55, None, 5.0), "stage": "dpo", "final_eval_loss": 0.25}]
    monkeypatch.setattr(comparison, "rows", lambda: rows)
    text = comparison.recommendation()
    assert "recommended within each stage" in text
    sft, dpo = text.split("Supervised fine-tuning (SFT): ")[1].split("Direct preference optimisation (DPO): ")
    assert "Use sft-lora" in sft and "dpo" not in sft  # the lower cross-entropy
    assert "Use dpo-lora" in dpo and "sft-" not in dpo  # the higher preference accuracy, despite its DPO loss
    with pytest.raises(ValueError, match="different stages .sft, dpo."):
        comparison.best()
    with pytest.raises(ValueError, match="different stages"):
        comparison.best(by="final_eval_loss")
    assert comparison.best(stage="dpo").variants == ["dpo-lora"]
    assert comparison.best(stage="sft").variants == ["sft-lora"]
    assert comparison.best(by="trainable_percent").variants == ["sft-lora", "dpo-lora"]  # a cost ranks across
    with pytest.raises(ValueError, match="'grpo' is not one of the compared stages"):
        comparison.best(stage="grpo")


def test_generations_side_by_side_answer_with_every_stage_each_as_it_was_trained(staged, monkeypatch):
    comparison, _, _ = staged
    from nbtune import generation

    templated = {}
    run_answers = generation._run_answers

    def spy(run, prompts, settings):
        templated[run.config.training.stage] = settings.chat_template
        return run_answers(run, prompts, settings)

    monkeypatch.setattr(generation, "_run_answers", spy)
    answers = comparison.generations(["What is 3 plus 1?", "What is 5 plus 1?"], max_new_tokens=4)
    assert answers.columns == ["base", "sft-lora", "dpo-lora"]
    assert all(len(answers.answers[c]) == 2 for c in answers.columns)
    assert templated == {"sft": False, "dpo": True}  # plain prompts as they are, conversational pairs templated
    assert "Answers side by side" in comparison.to_html()
    monkeypatch.setattr(generation, "_run_answers", lambda *a, **k: pytest.fail("a model was loaded again"))
    again = comparison.generations(["What is 3 plus 1?", "What is 5 plus 1?"], max_new_tokens=4)
    assert again.served_from_store and again.answers == answers.answers


def test_a_grpo_variant_brings_its_own_metrics_and_accuracy_words(staged, monkeypatch):
    _, base, store = staged
    prompts = [{"prompt": f"What is {i} plus 1?", "answer": f"{i + 1}"} for i in range(16)]
    grpo = {"method": "lora", "training.stage": "grpo", "data.source": prompts, "training.num_generations": 4,
            "training.max_completion_length": 8}
    variants = {"sft-lora": STAGED["sft-lora"], "grpo-lora": grpo}
    comparison = nbtune.compare(base, variants=variants, store=store, progress=False)
    row = comparison.to_pandas().loc["grpo-lora"]
    assert row["state"] == "finished" and row["stage"] == "grpo"
    assert 0 <= row["eval_accuracy"] <= 1 and row["completion_length"] > 0 and math.isfinite(row["reward"])
    assert "reward_margin" not in row  # no DPO variant: no DPO columns
    page = comparison.table_html()
    assert "mean reward" in re.findall(r"<th>(.*?)</th>", page) and "grpo: held-out exact match" in page
    assert "Group relative policy optimisation (GRPO): " in comparison.recommendation()


def test_the_bases_own_method_keeps_its_parameters_and_the_others_take_their_defaults():
    """compare(config, methods=["lora", "full"]) on a config that tunes LoRA with r=4 compares that LoRA (the run
    already trained is reused), not the registry's r=8; a method named by a variant's dotted changes starts from
    the registry's defaults too."""
    from nbtune import TuneConfig
    from nbtune.comparison import variant_config

    base = TuneConfig(method={"name": "lora", "r": 4})
    assert variant_config(base, "lora") == base
    assert variant_config(base, "ia3").method.params == {} and variant_config(base, "ia3").method.name == "ia3"
    assert variant_config(base, {"method": "lora"}).method_params["r"] == TuneConfig().method_params["r"]
