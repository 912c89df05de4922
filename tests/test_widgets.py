"""The notebook UI without a browser: ipywidgets' dummy comm, a real run on the embedded default, a fake clock."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from nbtune.widgets import progress

from nbtune import TuneConfig, stages
from nbtune.config import section_fields
from nbtune.events import Event, EventStream
from nbtune.methods import registry
from nbtune.units import format_bytes

pytest.importorskip("ipywidgets")

from nbtune.widgets import charts, status  # noqa: E402
from nbtune.widgets.builder import SECTION_TITLES, Builder  # noqa: E402
from nbtune.widgets.dashboard import Dashboard  # noqa: E402
from nbtune.widgets.data_preview import TRAINED_STYLE  # noqa: E402
from nbtune.widgets.forms import STYLE, described_choices, parse_value  # noqa: E402
from nbtune.widgets.memory_panel import MAX_SUGGESTIONS  # noqa: E402

NEVER = 3600.0  # a debounce that never fires during a test: no estimate runs unless the test asks for one


def tiny(**changes: object) -> TuneConfig:
    """The embedded default, cut down to a few seconds of CPU training."""
    base = {"training.max_steps": 6, "training.log_every": 1, "training.eval_every": 3, "data.max_samples": 48,
            "data.max_eval_samples": 16, "training.micro_batch_size": 4}
    return TuneConfig().replace(**{**base, **changes})


def wait_until(condition, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


# ----- the builder -------------------------------------------------------------------------------------------

def load_bench(name: str):  # noqa: ANN201
    import importlib.util
    import sys as _sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    _sys.modules[name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_the_builder_appears_in_a_fresh_process_before_anything_heavy_is_imported():
    result = load_bench("bench_builder").sample()  # a fresh interpreter: Builder(), display, then the loading
    assert result["heavy_at_display"] == []  # no torch, transformers, peft or plotly before the first display
    assert result["controls"] >= 30 and result["methods_at_display"] == len(registry.names(include_generated=False))
    assert result["estimating_at_display"]
    assert result["methods_loaded"] == len(registry.names()) and result["estimate"]


def test_the_method_dropdown_lists_every_registry_method_with_its_description_once_loaded():
    b = Builder(debounce_s=NEVER)
    b.method.value = "qlora"
    b.controls["method.r"].input.value = 4
    assert b.wait_loaded(timeout=300)
    assert b.methods_note.value == ""
    options = dict((value, label) for label, value in b.method.options)
    assert list(options) == registry.names()
    for m in registry.all_methods():
        assert m.description in options[m.name]
    assert b.method.value == "qlora" and b.controls["method.r"].value == 4  # the loading kept the user's choice
    assert b.methods_note.value == "" and any(m.generated for m in b.methods)
    assert "vera" in b.task_note.value


def test_a_yaml_with_a_generated_method_loads_into_the_form_before_the_background_loading():
    b = Builder(debounce_s=NEVER)
    b.load_yaml("method: {name: vera, r: 32}")
    assert b.method.value == "vera" and b.controls["method.r"].value == 32
    assert b.config.method.name == "vera" and b.methods_loaded.is_set()


def test_changing_the_method_swaps_in_its_registry_fields_with_help_as_tooltips():
    b = Builder(debounce_s=NEVER)
    b.wait_loaded(timeout=300)
    for method in registry.all_methods():
        b.method.value = method.name
        shown = {d.split(".", 1)[1]: c for d, c in b.controls.items() if d.startswith("method.")}
        assert list(shown) == [f.name for f in method.fields], method.name
        for f in method.fields:
            tip = shown[f.name].input.tooltip if shown[f.name].input.has_trait("tooltip") else \
                shown[f.name].input.description_tooltip
            assert tip == f.help
    b.method.value = "lora"
    assert "method.r" in b.controls and "method.feedforward_modules" not in b.controls
    b.method.value = "ia3"
    assert "method.r" not in b.controls and "method.feedforward_modules" in b.controls
    assert b.config.method.name == "ia3"


def test_config_fields_show_their_stated_help_and_the_prompt_template_is_multi_line():
    import ipywidgets

    b = Builder(debounce_s=NEVER)
    for section in ("model", "data", "training", "distributed"):
        for f in section_fields(section):
            if f"{section}.{f.name}" == "training.stage":
                continue  # its tooltip describes the chosen stage (below)
            control = b.controls[f"{section}.{f.name}"].input
            tip = control.tooltip if control.has_trait("tooltip") else control.description_tooltip
            assert tip == f.help, f.name
    assert isinstance(b.controls["data.prompt_template"].input, ipywidgets.Textarea)
    b.controls["data.prompt_template"].input.value = "Q: {question}\nA: "
    assert b.config.data.prompt_template == "Q: {question}\nA: "  # kept as typed, trailing space included


def test_shared_method_fields_keep_their_value_across_a_switch():
    b = Builder(debounce_s=NEVER)
    b.controls["method.r"].input.value = 4
    b.method.value = "qlora"
    assert b.controls["method.r"].value == 4
    assert b.config.method_params["r"] == 4


def tooltip(widget) -> str:  # noqa: ANN001
    """A control's hover help under ipywidgets 8 (`tooltip`) and 7 (`description_tooltip`)."""
    return widget.tooltip if widget.has_trait("tooltip") else widget.description_tooltip


def test_the_stage_is_the_first_training_choice_labelled_by_title_with_its_description_and_trainer():
    b = Builder(tiny(), debounce_s=NEVER)
    stage = b.controls["training.stage"]
    assert b.sections.children[SECTION_TITLES.index("Training")].children[0] is stage.box
    assert list(stage.input.options) == [(s.title, s.name) for s in stages.STAGES.values()]
    stage.input.value = "dpo"
    dpo = stages.STAGES["dpo"]
    assert dpo.description in tooltip(stage.input) and dpo.trainer in tooltip(stage.input)
    assert "TRL DPOTrainer" in b.stage_note.value and b.config.training.stage == "dpo"
    assert "dpo with lora on nbtune:tiny" in status.ready_html(b.config)  # what Ready says it will run


def test_fields_only_some_stages_read_show_only_for_them():
    b = Builder(tiny(), debounce_s=NEVER)

    def visible() -> set[str]:
        return {n for n in stages.ONLY_SOME_READ if b.controls[f"training.{n}"].box.layout.display != "none"}

    assert visible() == {"packing", "loss_implementation"}  # a user of SFT never sees beta
    b.controls["training.stage"].input.value = "dpo"
    assert visible() == {"beta"} and not b.controls["training.beta"].input.disabled
    b.controls["training.beta"].input.value = 0.3
    assert b.config.training.beta == 0.3
    b.controls["training.stage"].input.value = "grpo"
    assert visible() == set(stages.STAGES["grpo"].reads)
    b.set_config(tiny())
    assert visible() == {"packing", "loss_implementation"}


def test_dpo_with_chat_data_marks_the_format_with_the_configs_message_in_the_forms_words():
    b = Builder(tiny(**{"data.source": "nbtune:chat", "data.format": "chat"}), debounce_s=NEVER)
    assert b.controls["data.format"].problem is None
    b.controls["training.stage"].input.value = "dpo"
    fmt = b.controls["data.format"]
    assert fmt.problem == "data.format chat cannot train with training.stage dpo, which trains preference"
    assert "format chat cannot train with stage dpo, which trains preference" in fmt.message.value
    assert "nbtune-invalid" in fmt.input._dom_classes and b.launch_button.disabled
    assert "1 problem to fix: format (Data tab)" in b.status.value


def test_a_problem_of_a_field_the_stage_hides_is_said_in_full_in_the_status_line():
    b = Builder(tiny(**{"training.stage": "dpo"}), debounce_s=NEVER)
    b.controls["training.beta"].input.value = -1
    b.controls["training.stage"].input.value = "sft"  # beta hides with its bad value; the status says it all
    assert b.controls["training.beta"].box.layout.display == "none" and b.launch_button.disabled
    assert "beta must be" in b.status.value


def test_the_preview_of_preference_pairs_highlights_the_chosen_answer_and_names_the_stage_that_trains_them():
    b = Builder(tiny(**{"data.source": "nbtune:prefs", "training.stage": "dpo"}), debounce_s=NEVER)
    result = b.preview()
    assert result is not None and result["format"] == "preference" and result["trainable"]
    chosen = [text for text, trained in result["rows"][0]["pieces"] if trained]
    assert chosen and f"<span style='{TRAINED_STYLE}'>{html.escape(chosen[0])}</span>" in b.preview_out.value
    assert "the chosen answer" in b.preview_out.value and "cannot train it" not in b.preview_out.value
    b.controls["training.stage"].input.value = "sft"
    b.preview()
    assert "stage sft cannot train it: choose stage dpo or kto (Training tab)" in b.preview_out.value


def test_a_bad_value_marks_its_field_with_the_message_and_disables_launch():
    b = Builder(tiny(), debounce_s=0)
    assert not b.launch_button.disabled
    batch = b.controls["training.micro_batch_size"]
    batch.input.value = 0
    assert b.launch_button.disabled
    assert batch.problem == "training.micro_batch_size must be an integer >= 1 (got 0)"  # the config's own words
    assert "micro batch size must be an integer &gt;= 1, got 0" in batch.message.value  # the form's words
    assert batch.message.layout.display != "none" and "nbtune-invalid" in batch.input._dom_classes
    assert "1 problem" in b.status.value

    b.controls["method.r"].input.value = 0  # a registry field is validated the same way
    assert "method.r must be >= 1" in b.controls["method.r"].problem
    assert "2 problems" in b.status.value
    lr = b.controls["training.learning_rate"]
    lr.input.value = "fast"
    assert lr.problem == "training.learning_rate must be > 0 and <= 1 (got 'fast')"

    batch.input.value = 8
    b.controls["method.r"].input.value = 8
    lr.input.value = "2e-4"
    assert not b.launch_button.disabled
    assert batch.problem is None and batch.message.value == "" and "nbtune-invalid" not in batch.input._dom_classes
    assert b.config.training.micro_batch_size == 8 and b.config.training.learning_rate == 2e-4


def test_the_builder_starts_from_a_config_and_reads_it_back():
    config = TuneConfig(method={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                        training={"learning_rate": 1e-3, "max_steps": 20, "eval_every": None},
                        data={"max_samples": 100, "eval_split": 0.2})
    b = Builder(config, debounce_s=NEVER)
    assert b.config.to_dict(resolved=True) == config.to_dict(resolved=True)
    assert b.controls["method.target_modules"].input.value == "q_proj, v_proj"


def test_code_and_yaml_export_and_yaml_loads_back_into_the_form():
    b = Builder(tiny(), debounce_s=NEVER)
    assert b.code.value == b.config.to_code() and "nbtune.launch(config)" in b.code.value
    assert TuneConfig.from_yaml(b.yaml.value).to_dict() == b.config.to_dict()
    namespace: dict[str, object] = {}
    exec(b.code.value.replace("run = nbtune.launch(config)", ""), namespace)  # the cell is runnable
    assert namespace["config"].to_dict(resolved=True) == b.config.to_dict(resolved=True)

    other = tiny(method="ia3", **{"training.micro_batch_size": 2})
    b.load_yaml(other.to_yaml())
    assert b.method.value == "ia3" and b.config.to_dict(resolved=True) == other.to_dict(resolved=True)
    b.load_yaml("training: {micro_batch_size: -1}")
    assert "training.micro_batch_size" in b.load_message.value and b.method.value == "ia3"


def test_in_memory_rows_survive_the_form():
    rows = [{"text": f"say {i}", "target": f" {i}"} for i in range(20)]
    config = TuneConfig(data={"source": rows, "text_column": "text", "target_column": "target", "eval_split": 0.25})
    b = Builder(config, debounce_s=NEVER)
    assert b.controls["data.source"].input.disabled
    assert b.config.data.source == rows


def test_data_preview_shows_templated_rows_counts_and_truncation():
    b = Builder(tiny(**{"data.max_length": 12}), debounce_s=NEVER)
    result = b.preview()
    assert result is not None and result["train_rows"] == 48
    assert result["truncated"] == sum(n > 12 for n in result["token_lengths"]) > 0
    assert result["rows"][0]["input"] in b.preview_out.value.replace("&#x27;", "'")
    assert "longer than max_length 12" in b.preview_out.value


# ----- the memory panel --------------------------------------------------------------------------------------

def test_the_memory_panel_draws_estimate_memory_of_the_forms_config():
    from nbtune.estimator import estimate_memory

    b = Builder(tiny(), debounce_s=0)
    b.controls["training.micro_batch_size"].input.value = 8
    b.memory.gpu.value = "l4"
    expected = estimate_memory(b.config, gpu="l4")
    assert b.memory.segments == [(k, v) for k, v in expected.breakdown.items() if v]
    assert sum(v for _, v in b.memory.segments) == expected.total_bytes
    assert expected.verdict in b.memory.verdict.value


def test_a_suggestion_applies_itself_to_the_form():
    b = Builder(tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096}), debounce_s=0)
    assert "does not fit" in b.memory.verdict.value
    suggestions = b.memory.estimate.suggestions[:MAX_SUGGESTIONS]
    assert suggestions and len(b.memory.suggestions.children) == len(suggestions) + 1  # the legend, then rows
    first = suggestions[0]
    b.memory.suggestion_rows[0].apply_button.click()
    for dotted, value in first.changes.items():
        assert b.controls[dotted].value == value
    assert b.memory.estimate.total_bytes == first.total_bytes
    assert b.problems == [] and b._config is not None  # applying keeps the form valid


def test_the_memory_panel_says_it_is_estimating_until_the_first_estimate_lands():
    b = Builder(tiny(), debounce_s=NEVER)
    assert "Estimating" in b.memory.verdict.value and "estimating" in b.memory.title.value
    assert not b.memory.wait(0)
    b.load_in_background()  # what displaying the builder starts: the first estimate at once, not after a debounce
    assert b.memory.wait(timeout=300)
    assert b.memory.estimate is not None and "instant estimate" in b.memory.title.value
    assert "fits" in b.memory.verdict.value and "Estimating" not in b.memory.verdict.value


def test_an_invalid_form_clears_the_estimate_instead_of_showing_a_stale_one():
    b = Builder(tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096}), debounce_s=0)
    panel = b.memory
    assert panel.bar.value and panel.legend.value and panel.suggestions.children  # drawn, with suggestions
    b.controls["training.learning_rate"].input.value = "5"
    assert "Fix the marked fields" in panel.verdict.value
    assert panel.bar.value == "" and panel.legend.value == "" and panel.suggestions.children == ()
    assert panel.segments == [] and panel.estimate is None and panel.fit_button.layout.display == "none"


def test_typing_in_a_text_field_re_estimates_within_a_second_without_waiting_for_focus_to_leave():
    b = Builder(tiny(), debounce_s=0.3)  # the builder's own debounce
    b.load_in_background()
    assert b.memory.wait(timeout=300)
    name = b.controls["model.name_or_path"].input
    assert name.continuous_update and b.controls["training.micro_batch_size"].input.continuous_update
    name.value = "meta-llama/Llama-2-7b-hf"  # the first estimate of a model reads its shape: may take seconds
    assert b.memory.wait(timeout=60)
    name.value = "nbtune:tiny"
    assert b.memory.wait(timeout=60) and b.memory.estimate.total_params < 1e7
    name.value = "meta-llama/Llama-2-7b-hf"  # what a keystroke sends when the input updates continuously
    assert b.memory.wait(timeout=1.0)
    assert b.memory.estimate.total_params > 6e9  # the 7B model's estimate, not the embedded one's


def test_suggestions_are_rows_with_apply_the_whole_resulting_size_a_fits_mark_and_the_cost():
    b = Builder(tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096}), debounce_s=0)
    panel = b.memory
    assert "✔ fits the GPU with the change · ✘ still too big" in panel.suggestions.children[0].value
    for suggestion, row in zip(panel.estimate.suggestions, panel.suggestion_rows, strict=False):
        assert row.apply_button.description == "Apply" and row.apply_button.button_style == ""  # one style
        assert suggestion.description in row.text.value.replace("&#x27;", "'")  # never cut
        assert format_bytes(suggestion.total_bytes) in row.size.value and "nowrap" in row.size.value
        assert ("✔" if suggestion.fits else "✘") in row.size.value
        assert html.escape(getattr(suggestion, "cost", "")) in row.text.value


def test_fit_to_gpu_applies_a_change_that_fits_and_hides_once_it_does():
    b = Builder(tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096}), debounce_s=0)
    panel = b.memory
    assert panel.fit is not None and panel.fit_button.layout.display != "none" and not panel.fit_button.disabled
    panel.fit_button.click()
    assert b.problems == [] and panel.estimate.fits(panel.gpu.value)
    assert panel.fit_button.layout.display == "none"  # the config fits: nothing to fit


def test_fit_to_gpu_is_disabled_with_a_reason_when_nothing_makes_it_fit(monkeypatch):
    from nbtune.widgets import memory_panel

    monkeypatch.setattr(memory_panel, "fit_for", lambda estimate, config, gpu: None)
    b = Builder(tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096}), debounce_s=0)
    assert b.memory.fit_button.layout.display != "none" and b.memory.fit_button.disabled
    assert "No change nbtune knows of" in tooltip(b.memory.fit_button)


# ----- Ready means runnable ------------------------------------------------------------------------------------

def test_ready_only_when_nothing_stands_in_the_way_and_it_follows_the_gpu_dropdown():
    b = Builder(tiny(), debounce_s=0)
    assert "✔ Ready" in b.status.value and "nbtune-ready" in b.status._dom_classes
    assert not b.launch_button.disabled

    b.apply({"training.micro_batch_size": 8192})  # far beyond the T4's 15.6 GiB
    assert "✘ Not ready: needs" in b.status.value and "the T4 has 15.6 GiB" in b.status.value
    assert "nbtune-not-ready" in b.status._dom_classes and "nbtune-ready" not in b.status._dom_classes
    assert b.launch_button.disabled and "GiB over" in tooltip(b.launch_button)

    b.memory.gpu.value = "h200"
    assert b.memory.wait(timeout=60) and "✔ Ready" in b.status.value and not b.launch_button.disabled


def test_a_hub_model_that_is_not_cached_while_offline_is_not_ready(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = Builder(tiny(**{"model.name_or_path": "nbtune-test/no-such-model-anywhere"}), debounce_s=0)
    assert "✘ Not ready" in b.status.value and "not in the local cache" in b.status.value
    assert "offline" in tooltip(b.launch_button) and b.launch_button.disabled
    assert "name or path" in b.status.value and "model.name_or_path (Model tab)" in b.status.value


def test_readiness_says_why_in_plain_words_and_never_raises_for_a_bad_hub_id(monkeypatch):
    from nbtune import preflight
    from nbtune.estimator import estimate_memory

    big = tiny(**{"training.micro_batch_size": 512, "data.max_length": 4096})
    over = preflight.readiness(big, "t4", estimate_memory(big, gpu="t4"))
    assert [b.field for b in over] == ["data.max_length", ""]  # beyond the model's positions, and too big
    assert "must be <= 128, the positions nbtune:tiny was trained for" in over[0].message
    assert re.fullmatch(r"needs [\d.]+ GiB, the T4 has 15.6 GiB: [\d.]+ GiB over", over[1].message)
    assert preflight.readiness(tiny(), "t4", estimate_memory(tiny(), gpu="t4")) == []

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = preflight.readiness(tiny(**{"model.name_or_path": "not a/hub id"}))
    assert [b.field for b in bad] == ["model.name_or_path"]  # a Blocker, not an exception
    missing = preflight.readiness(tiny(**{"model.name_or_path": "./no/such/folder"}))
    assert "no such model folder" in missing[0].message


def test_a_config_read_back_without_its_in_memory_rows_is_not_ready():
    from nbtune import preflight

    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(20)]
    written = tiny(**{"data.source": rows}).to_yaml()
    assert "in-memory: 20 rows" in written and "Q7" not in written  # the rows are not copied into the YAML
    back = TuneConfig.from_yaml(written)
    assert [b.field for b in preflight.readiness(back)] == ["data.source"]
    assert preflight.readiness(tiny(**{"data.source": rows})) == []


def test_fp16_loss_scaling_over_fp16_weights_of_full_fine_tuning_is_not_ready():
    from nbtune import preflight

    full = tiny(method="full", **{"model.dtype": "fp16", "training.precision": "fp16"})
    assert [b.field for b in preflight.readiness(full, "t4")] == ["model.dtype"]
    assert preflight.readiness(full.replace(**{"model.dtype": "fp32"}), "t4") == []
    lora = tiny(**{"model.dtype": "fp16", "training.precision": "fp16"})  # peft keeps its adapters in fp32
    assert preflight.readiness(lora, "t4") == []


def test_a_readiness_check_that_raises_says_why_instead_of_checking_for_ever(monkeypatch):
    from nbtune import preflight

    def fails(*args, **kwargs):
        raise ValueError("Unrecognized configuration class LlamaConfig " + "for this kind of AutoModel " * 40)

    monkeypatch.setattr(preflight, "readiness", fails)
    b = Builder(tiny(), debounce_s=0)
    said = html.unescape(re.sub(r"<[^>]+>", "", b.status.value))
    assert said.startswith("✘ Not ready: the checks of whether this config can run failed: ValueError: "
                           "Unrecognized configuration class LlamaConfig"), said
    assert said.endswith("…") and len(said) < 420, said  # the exception's own text, cut short
    assert not b.ready and b.launch_button.disabled and "nbtune-not-ready" in b.status._dom_classes


CAPTION = re.compile(r"a \w+ (circle|cross|diamond|square|triangle) in the (top|bottom) (left|right)")


def test_choosing_image_to_text_swaps_in_the_built_in_captioner_and_its_captions_and_previews_them():
    from nbtune.widgets.builder import BUILT_IN_MODELS

    from nbtune import embedded

    # every task with a built-in dataset has its built-in model to swap in, one that nbtune ships
    assert {d.task for d in embedded.DATASETS.values()} <= set(BUILT_IN_MODELS)
    assert set(BUILT_IN_MODELS.values()) <= set(embedded.MODELS)
    b = Builder(tiny(), debounce_s=0)
    task, model, source = (b.controls[d] for d in ("model.task", "model.name_or_path", "data.source"))
    assert (task.value, model.value, source.value) == ("causal-lm", "nbtune:tiny", "nbtune:capitals")
    task.input.value = "image-to-text"  # as the user chooses it on the Task tab
    assert (model.value, source.value) == ("nbtune:tiny-captioner", "nbtune:shape-captions")
    assert b.config.model.task == "image-to-text" and b.config.model.name_or_path == "nbtune:tiny-captioner"
    assert ("image-to-text: switched to the built-in nbtune:tiny-captioner on nbtune:shape-captions"
            in b.switch_note.value)
    assert "✔ Ready" in b.status.value and not b.launch_button.disabled, b.status.value
    assert re.search(r"Methods for this task: full, freeze, bitfit, lora\b", b.task_note.value), b.task_note.value

    result = b.preview()  # the captions under their images
    assert result is not None and result["format"] == "image" and result["train_rows"] == 48
    shown = b.preview_out.value
    assert "<th>caption</th>" in shown and shown.count("src='data:image/png;base64,") == len(result["rows"]) == 5
    captions = [r["target"] for r in result["rows"]]
    assert all(CAPTION.fullmatch(c) and html.escape(c, quote=True) in shown for c in captions), captions

    model.input.value = "./my-captioner"  # a model of the user's own: the note no longer says it was swapped in
    assert b.switch_note.value == ""
    task.input.value = "image-cls"  # ... and stays when the task changes; the built-in captions give way
    assert (model.value, source.value) == ("./my-captioner", "nbtune:shapes")
    assert "image-cls: switched to the built-in nbtune:shapes;" in b.switch_note.value
    b.apply({"model.name_or_path": "nbtune:tiny-captioner", "data.source": "my_captions.jsonl"})
    task.input.value = "seq-cls"  # a built-in model of another task gives way; the user's own data stays
    assert (model.value, source.value) == ("nbtune:tiny", "my_captions.jsonl")
    b.apply({"model.task": "image-to-text"})  # a change from code is taken as it is given
    assert (task.value, model.value, source.value) == ("image-to-text", "nbtune:tiny", "my_captions.jsonl")
    assert b.switch_note.value == ""


def test_a_problem_reads_in_the_forms_words_and_says_where_it_is():
    b = Builder(tiny(), debounce_s=NEVER)
    lr = b.controls["training.learning_rate"]
    lr.input.value = "5"
    assert "learning rate must be &gt; 0 and &lt;= 1, got 5" in lr.message.value
    assert "<span class='nbtune-path'>training.learning_rate</span>" in lr.message.value  # the path, in grey
    assert "1 problem to fix: learning rate (Training tab)" in b.status.value
    titles = [b.sections.get_title(i) for i in range(len(SECTION_TITLES))]
    assert titles == ["Model", "Task", "Data", "Method", "Training ⚠", "Distributed"]
    b.controls["method.r"].input.value = 0
    assert "2 problems to fix: r (Method tab), learning rate (Training tab)" in b.status.value
    assert b.sections.get_title(3) == "Method ⚠"
    lr.input.value = "2e-4"
    b.controls["method.r"].input.value = 8
    assert [b.sections.get_title(i) for i in range(len(SECTION_TITLES))] == list(SECTION_TITLES)


# ----- the distributed section, trackers and extra TrainingArguments ---------------------------------------------

def test_the_distributed_tab_offers_each_strategy_in_its_words_and_shows_only_the_fields_it_reads():
    b = Builder(tiny(), debounce_s=NEVER)
    tab = b.sections.children[SECTION_TITLES.index("Distributed")]
    assert [c.box for d, c in b.controls.items() if d.startswith("distributed.")] == [
        box for box in tab.children if box is not b.distributed_note]
    strategy = b.controls["distributed.strategy"]
    words = described_choices(strategy.field)
    assert set(words) == set(strategy.field.choices)  # the help describes every strategy, once
    assert all(f"{name} ({said})" in strategy.field.help for name, said in words.items())
    assert list(strategy.input.options) == [(f"{name} — {words[name]}", name) for name in strategy.field.choices]

    def visible() -> set[str]:
        return {d.split(".")[1] for d, c in b.controls.items()
                if d.startswith("distributed.") and c.box.layout.display != "none"}

    assert visible() == {"strategy", "processes", "nodes"}  # one process: nothing to shard or offload
    for chosen, shown in (("fsdp", {"sharding", "cpu_offload"}), ("zero2", {"cpu_offload"}), ("zero3", {"cpu_offload"}),
                          ("ddp", set())):
        strategy.input.value = chosen
        assert visible() == {"strategy", "processes", "nodes", *shown}, chosen
        assert b.config.distributed.strategy == chosen and words[chosen] in b.distributed_note.value


def test_the_distributed_note_says_the_effective_batch_of_all_processes():
    b = Builder(tiny(**{"training.gradient_accumulation_steps": 2}), debounce_s=NEVER)
    assert "processes in all" not in b.distributed_note.value
    b.apply({"distributed.strategy": "ddp", "distributed.processes": 4, "distributed.nodes": 2})
    t = b.config.training
    assert (f"8 processes in all (4 per node x 2 nodes): effective batch {t.micro_batch_size} x 2 x 8 = "
            f"{t.micro_batch_size * 2 * 8} examples per optimizer step") in b.distributed_note.value


def test_a_distributed_problem_lands_on_its_field_and_the_distributed_tab():
    b = Builder(tiny(), debounce_s=NEVER)
    b.controls["distributed.processes"].input.value = 2  # still strategy none
    strategy = b.controls["distributed.strategy"]
    assert strategy.problem is not None and strategy.problem.startswith("distributed.strategy none trains in one")
    assert "strategy none trains in one process, but processes x nodes is 2 x 1" in strategy.message.value
    assert "1 problem to fix: strategy (Distributed tab)" in b.status.value and b.launch_button.disabled
    assert b.sections.get_title(SECTION_TITLES.index("Distributed")) == "Distributed ⚠"
    strategy.input.value = "ddp"
    assert b.problems == [] and b.sections.get_title(SECTION_TITLES.index("Distributed")) == "Distributed"


def test_a_set_option_another_strategy_rejects_stays_shown_so_it_can_be_put_back():
    b = Builder(tiny(), debounce_s=NEVER)
    b.apply({"distributed.strategy": "fsdp", "distributed.processes": 2, "distributed.nodes": 2,
             "distributed.sharding": "hybrid"})
    assert b.problems == []
    b.controls["distributed.strategy"].input.value = "ddp"  # hybrid is an FSDP option
    sharding = b.controls["distributed.sharding"]
    assert sharding.box.layout.display != "none" and sharding.problem is not None
    assert "sharding hybrid is an FSDP option" in sharding.message.value
    sharding.input.value = "full"
    assert b.problems == [] and sharding.box.layout.display == "none"  # put back: hidden again, as ddp reads none


def test_the_distributed_section_reads_back_and_shows_in_code_and_yaml_only_when_set():
    plain = Builder(tiny(), debounce_s=NEVER)
    assert "distributed" not in plain.code.value  # one process: the cell is as before
    assert TuneConfig.from_yaml(plain.yaml.value).distributed == plain.config.distributed
    config = tiny(**{"distributed.strategy": "fsdp", "distributed.processes": 4, "distributed.nodes": 2,
                     "distributed.sharding": "hybrid", "distributed.cpu_offload": True})
    b = Builder(config, debounce_s=NEVER)
    assert b.config.to_dict() == config.to_dict()
    assert "distributed={'strategy': 'fsdp', 'processes': 4, 'nodes': 2" in b.code.value
    namespace: dict[str, object] = {}
    exec(b.code.value.replace("run = nbtune.launch(config)", ""), namespace)
    assert namespace["config"].distributed == config.distributed
    assert TuneConfig.from_yaml(b.yaml.value).distributed == config.distributed
    plain.load_yaml(b.yaml.value)
    assert plain.config.to_dict() == config.to_dict() and plain.controls["distributed.sharding"].value == "hybrid"


def test_report_to_is_a_multi_choice_of_the_trackers_installed_here(monkeypatch):
    import ipywidgets
    from nbtune.widgets import builder as builder_module

    monkeypatch.setattr(builder_module, "installed_trackers", lambda: (["tensorboard", "wandb"],
                                                                      ["mlflow", "tensorboard", "wandb"]))
    b = Builder(tiny(**{"training.report_to": ["mlflow"]}), debounce_s=NEVER)
    report_to = b.controls["training.report_to"]
    assert isinstance(report_to.input, ipywidgets.SelectMultiple)
    assert report_to.input.value == ("mlflow",) and "Finding the experiment trackers" in b.trackers_note.value
    assert b.wait_loaded(timeout=300)
    assert list(report_to.input.options) == [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("mlflow (not installed here)", "mlflow")]
    assert report_to.input.value == ("mlflow",) and "Installed here: tensorboard, wandb" in b.trackers_note.value
    report_to.input.value = ("tensorboard", "wandb")
    assert b.config.training.report_to == ["tensorboard", "wandb"] and "'report_to': ['tensorboard'" in b.code.value
    b.set_config(tiny())
    assert b.config.training.report_to == [] and [v for _, v in report_to.input.options] == ["tensorboard", "wandb"]


def test_the_trackers_offered_are_those_transformers_finds_installed():
    from transformers.integrations import get_available_reporting_integrations

    b = Builder(tiny(), debounce_s=NEVER)
    assert b.wait_loaded(timeout=300)
    installed = get_available_reporting_integrations()
    assert b.trackers == installed
    assert [v for _, v in b.controls["training.report_to"].input.options] == installed
    said = "Installed here: " if installed else "No experiment tracker is installed here"
    assert said in b.trackers_note.value


def test_extra_arguments_are_yaml_or_json_text_that_parses_into_a_mapping_or_says_why_not():
    import ipywidgets

    b = Builder(tiny(), debounce_s=NEVER)
    extra = b.controls["training.extra_arguments"]
    assert isinstance(extra.input, ipywidgets.Textarea) and extra.input.value == "" and b.problems == []
    extra.input.value = "ddp_timeout: 3600\nlogging_first_step: true  # YAML, comments too"
    assert b.config.training.extra_arguments == {"ddp_timeout": 3600, "logging_first_step": True}
    extra.input.value = '{"ddp_timeout": 60}'
    assert b.config.training.extra_arguments == {"ddp_timeout": 60}
    extra.input.value = "ddp_timeout: [3"
    assert extra.problem is not None and extra.problem.startswith("training.extra_arguments must be a mapping")
    assert "not valid YAML or JSON" in extra.message.value and "line 1, column" in extra.message.value
    assert "1 problem to fix: extra arguments (Training tab)" in b.status.value and b.launch_button.disabled
    extra.input.value = "- ddp_timeout\n- 60"
    assert "the text reads as list" in extra.message.value
    extra.input.value = ""
    assert b.problems == [] and b.config.training.extra_arguments == {}
    config = tiny(**{"training.extra_arguments": {"run_name": "1e-4", "ddp_timeout": 60}})
    b.set_config(config)  # shown as text that reads back as it was: the run name stays text
    assert b.config.training.extra_arguments == config.training.extra_arguments
    assert "'extra_arguments': {'run_name': '1e-4'" in b.code.value


# ----- layout ----------------------------------------------------------------------------------------------------

def widget_tree(widget) -> list:  # noqa: ANN001
    children = getattr(widget, "children", ())
    return [widget, *(w for child in children for w in widget_tree(child))]


def test_the_layout_has_no_fixed_width_that_clips_between_1000_and_1400_pixels():
    b = Builder(tiny(), debounce_s=NEVER)
    b.wait_loaded(timeout=300)
    widths = [w.layout.width for w in widget_tree(b.box) if getattr(w, "layout", None) is not None]
    fixed = [int(width[:-2]) for width in widths if width and width.endswith("px")]
    assert max(fixed) <= 200  # buttons and progress bars only; every column and input follows its container
    assert not any(width and "calc" in width for width in widths)
    columns = b.box.children[1]
    assert columns.children == (b.sections, b.memory.box) and columns.layout.flex_flow == "row wrap"
    assert b.exports.layout.width == "100%" and b.method.layout.width == "100%"
    assert b.method.style.description_width == b.controls["training.learning_rate"].input.style.description_width


def test_launch_is_the_last_row_so_the_run_appears_right_under_the_button():
    b = Builder(tiny(), debounce_s=NEVER)
    assert b.launch_button in b.box.children[-1].children  # the dashboard's outputs follow the builder directly


# ----- the static copy a saved notebook keeps ----------------------------------------------------------------------

def test_a_displayed_builder_leaves_a_static_copy_of_its_config_and_estimate_kept_up_to_date(published):
    from IPython.display import display

    b = Builder(tiny(), debounce_s=0)
    display(b)
    assert b.wait_loaded(timeout=300)
    live, record = outputs_left(published)[:2]
    assert WIDGET_VIEW in live and "VBox" not in live["text/plain"]  # where no widget renders: words, no repr
    assert WIDGET_VIEW not in record and "nbtune-static-builder" in record["text/html"]
    assert record["text/plain"] == b.config.to_yaml()  # the YAML, readable without a kernel
    assert "nbtune-memory-bar" in record["text/html"] and "total at the peak" in record["text/html"]
    assert ".nbtune-static-builder, .nbtune-static-try-it { display: none; }" in STYLE  # hidden where the live builder renders

    b.controls["training.micro_batch_size"].input.value = 2
    record = outputs_left(published)[1]
    assert "micro_batch_size: 2" in record["text/plain"]
    assert "micro_batch_size: 2" in record["text/html"]
    assert len(outputs_left(published)) == 5  # updated in place, never a new output


# ----- launching, the dashboard, stopping --------------------------------------------------------------------

def test_launch_trains_the_embedded_default_and_the_dashboard_follows_it(tmp_path: Path):
    b = Builder(tiny(), store=tmp_path, debounce_s=NEVER)
    b.launch_button.click()
    run, dash = b.run, b.dashboard
    assert run is not None and dash.run is run
    dash.wait(timeout=300)
    assert run.status == "finished"
    assert dash.progress.state == "finished" and dash.progress.step == 6
    steps = [e for e in run.events.history if e.kind == "step"]
    counts = {t["name"]: len(t["x"]) for t in dash.figure["data"]}
    assert counts["train loss"] == len(steps) == 6 and counts["eval loss"] >= 2
    assert dash.bar.value == dash.bar.max == 6 and dash.stop_button.disabled
    assert "finished" in dash.status_html.value

    again = Dashboard(run.id, store=tmp_path)  # reopened from the store alone
    assert again.progress.state == "finished"
    assert {t["name"]: len(t["x"]) for t in again.figure["data"]} == counts


def test_stop_from_the_dashboard_stops_the_run(tmp_path: Path):
    b = Builder(tiny(**{"training.max_steps": 400}), store=tmp_path, debounce_s=NEVER)
    b.launch()
    dash = b.dashboard
    wait_until(lambda: dash.progress.step >= 2)
    dash.stop_button.click()
    assert dash.stop_button.disabled and (dash.stop_button.description.startswith("Stopping") or dash.progress.ended)
    dash.wait(timeout=120)
    assert b.run.status == "stopped" and dash.progress.state == "stopped"
    assert dash.stop_button.disabled and dash.stop_button.description == "Stop"  # no "Stopping…" once stopped
    assert dash.progress.step < 400
    assert "Stopped on request" in dash.status_html.value


def test_a_failed_run_says_why_in_plain_words(tmp_path: Path):
    config = tiny(**{"data.source": str(tmp_path / "missing.jsonl")})
    from nbtune import launch

    dash = Dashboard(launch(config, store=tmp_path), widgets=True)
    dash.wait(timeout=120)
    assert dash.progress.state == "failed"
    assert "missing.jsonl" in dash.status_html.value and "Failed" in dash.status_html.value


# ----- throttling and bounded display ------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_run(history: list[Event] | None = None, status: str = "running", run_id: str = "fake") -> SimpleNamespace:
    config = TuneConfig()
    return SimpleNamespace(
        id=run_id, config=config, status=status, summary=None, done=status != "running",
        events=EventStream(history=history or []), subscribe=lambda callback, replay=True: (lambda: None),
        stop=lambda: None, wait=lambda timeout=None: None)


def step_event(step: int, t: float) -> Event:
    return Event("step", t, {"step": step, "total_steps": 100_000, "epoch": step / 1000, "loss": 1 / step,
                             "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_s": 500.0, "elapsed_s": t,
                             "memory": {"rss": 2**30, "peak_rss": 2**30}})


def test_redraws_are_throttled_to_two_per_second_on_a_fake_clock():
    clock = FakeClock()
    dash = Dashboard(fake_run(), clock=clock, trailing=False, widgets=True)
    for step in range(1, 1001):  # 100 events a second for 10 seconds
        clock.now = step * 0.01
        dash._on_event(step_event(step, clock.now))
    assert 19 <= dash.renders <= 21
    assert dash.progress.step == 1000  # every event was folded in, drawn or not

    clock.now = 10.2  # within the window: no redraw, the next allowed one batches everything
    dash._on_event(step_event(1001, clock.now))
    assert dash.renders <= 21


def test_live_traces_never_exceed_two_thousand_points_while_the_store_keeps_all():
    clock = FakeClock()
    dash = Dashboard(fake_run(), clock=clock, trailing=False, widgets=True)
    for step in range(1, 20_001):
        clock.now += 0.01
        dash._on_event(step_event(step, clock.now))
    clock.now += 1.0
    dash._on_event(step_event(20_001, clock.now))
    counts = {t["name"]: len(t["x"]) for t in dash.figure["data"]}
    assert 1000 <= counts["train loss"] <= 2000
    assert dash.figure["data"][0]["x"][-1] == 20_001  # the latest point is always shown
    assert len(dash.progress.series["train loss"]) == 20_001  # every point is kept for the final record


def test_folding_an_event_costs_the_same_late_in_a_long_run():
    series = progress.Series(max_points=2000)
    for i in range(200_000):
        series.append(i, float(i))
    assert len(series.view()[0]) <= 2001 and series._stride <= 128
    x, y = series.full(max_points=5000)
    assert len(x) <= 5000 and x[-1] == 199_999


def test_a_finished_run_in_history_is_folded_without_a_thread():
    history = [Event("started", 0.0, {"total_steps": 3})] + [step_event(i, float(i)) for i in (1, 2, 3)] + [
        Event("finished", 4.0, {"step": 3})]
    dash = Dashboard(fake_run(history, status="finished"), trailing=False)
    assert dash.progress.state == "finished" and dash.progress.step == 3
    assert len(dash.figure["data"][0]["x"]) == 3


# ----- what the notebook keeps: one output per part, replaced in place (ipywidgets 7 and 8) ------------------

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def published(monkeypatch):
    """Every display message of the test, as (display id or None, update?, mime types), in order."""
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    messages: list[tuple[str | None, bool, dict]] = []

    class Recorder(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):  # noqa: ANN001
            messages.append(((transient or {}).get("display_id"), update, data))

    shell = InteractiveShell.instance()
    monkeypatch.setattr(shell, "display_pub", Recorder(shell=shell))
    monkeypatch.setenv("NBTUNE_STATIC_PNG", "0")  # the record's chart as HTML: no browser needed
    return messages


def outputs_left(messages: list) -> list[dict]:  # noqa: ANN001
    """The outputs a notebook keeps: each new display, with the last update of its display id."""
    outputs: list[dict] = []
    by_id: dict[str, int] = {}
    for display_id, update, data in messages:
        if update:
            if display_id in by_id:
                outputs[by_id[display_id]] = data
        else:
            if display_id is not None:
                by_id[display_id] = len(outputs)
            outputs.append(data)
    return outputs


def test_a_launch_from_the_builder_leaves_the_builder_and_one_record_no_stale_live_view(published, monkeypatch):
    from IPython.display import display

    import nbtune

    runs = iter([fake_run(run_id="first"), fake_run(run_id="second")])
    monkeypatch.setattr(nbtune, "launch", lambda config, store=None: next(runs), raising=False)
    b = Builder(debounce_s=NEVER)
    display(b)
    first = b.launch()
    first_dashboard = b.dashboard
    first_dashboard._on_event(step_event(1, 1.0))
    second = b.launch()  # launched again: the newest run's dashboard takes the outputs under the builder
    dash = b.dashboard
    for step in (1, 2, 3):
        dash._on_event(step_event(step, float(step)))
    first.status = second.status = "finished"
    first_dashboard._on_event(Event("finished", 2.0, {"step": 1}))  # the older run ends later: it writes nothing
    dash._on_event(Event("finished", 4.0, {"step": 3}))

    # the builder, its static copy and three outputs, never one more
    assert sum(not update for _, update, _ in published) == 5
    outputs = outputs_left(published)
    assert WIDGET_VIEW in outputs[0] and "nbtune-static-builder" in outputs[1]["text/html"]  # the builder
    assert [WIDGET_VIEW in o for o in outputs[2:]] == [False, False, False]  # no live view left below the record
    assert "finished" in outputs[2]["text/html"] and "second" in outputs[2]["text/html"]
    assert charts.PLOTLY_MIME in outputs[3] and "text/html" not in outputs[3]  # no CDN HTML: blank offline
    assert b.wait_loaded(timeout=300)  # its background estimate would update the static copy in a later test


def test_a_released_dashboard_no_longer_writes_into_the_builders_outputs(published):
    from IPython.display import display

    run = fake_run()
    dash = Dashboard(run, widgets=True)
    display(dash)
    dash.release()
    before = len(published)
    run.status = "finished"
    dash._on_event(Event("finished", 1.0, {"step": 0}))
    assert len(published) == before and dash.progress.state == "finished"


def test_a_comparison_shows_its_table_and_each_chart_once(published, tmp_path: Path):
    import nbtune

    comparison = nbtune.compare(tiny(), methods=["lora", "ia3"], store=tmp_path, train=False)
    comparison.show()
    assert not any(update for _, update, _ in published)  # shown once, never re-shown by an update
    tables = [data for _, _, data in published if "nbtune comparison" in data.get("text/html", "")]
    charts_shown = [data for _, _, data in published if charts.PLOTLY_MIME in data]
    assert len(tables) == 1 and len(charts_shown) == len(comparison.figures())  # loss, memory, quality, pareto
    assert not any(WIDGET_VIEW in data for _, _, data in published)


# ----- small engine helpers the UI relies on -----------------------------------------------------------------

def test_form_text_parses_into_config_values_or_stays_text_for_validation():
    f = registry.get("lora").field("target_modules")
    assert parse_value(f, "q_proj, v_proj") == ["q_proj", "v_proj"]
    lr = next(f for f in section_fields("training") if f.name == "learning_rate")
    assert parse_value(lr, "") is None
    assert parse_value(lr, "1e-4") == 1e-4
    assert parse_value(lr, "abc") == "abc"
    split = next(f for f in section_fields("data") if f.name == "eval_split")
    assert parse_value(split, "0.1") == 0.1
    assert parse_value(split, "validation") == "validation"
    template = next(f for f in section_fields("data") if f.name == "prompt_template")
    assert parse_value(template, "Q: {q}\nA: ") == "Q: {q}\nA: "  # multi-line text is kept as typed
    extra = next(f for f in section_fields("training") if f.name == "extra_arguments")
    assert parse_value(extra, "warmup_steps: 5\nrun_name: '1'") == {"warmup_steps": 5, "run_name": "1"}
    assert parse_value(extra, "  ") == {} and parse_value(extra, "# nothing") == {}
    assert parse_value(extra, "a: [1") == "a: [1"  # kept as text: the config names the field and the value


def test_eta_and_plain_words():
    assert progress.eta_seconds(25, 100, 10.0) == 30.0
    assert progress.eta_seconds(0, 100, 1.0) is None
    assert progress.format_duration(3725) == "1:02:05"
    assert progress.state_words("failed", "CUDA out of memory") == "Failed: CUDA out of memory"


# ----- the extension and its magics --------------------------------------------------------------------------

@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbtune")
    yield ip
    ip.run_line_magic("unload_ext", "nbtune")


def test_load_ext_is_fast_and_imports_nothing_heavy():
    result = load_bench("bench_load_ext").sample()
    assert result["magic"] and result["heavy"] == []
    assert result["seconds"] < 0.5


def test_magic_help_is_argparse_style_and_unload_reload_are_clean(shell):
    magic = shell.find_line_magic("nbtune")
    doc = magic.__doc__
    for piece in ("usage: %nbtune", "estimate", "--method", "--batch", "--seq", "runs", "compare", "%%nbtune",
                  "--wait", "leaves running runs running"):
        assert piece in doc
    assert shell.find_cell_magic("nbtune") is not None
    shell.run_line_magic("reload_ext", "nbtune")
    assert shell.find_line_magic("nbtune") is not None
    shell.run_line_magic("unload_ext", "nbtune")
    assert shell.find_line_magic("nbtune") is None and shell.find_cell_magic("nbtune") is None
    shell.run_line_magic("load_ext", "nbtune")


def test_estimate_magic_shows_the_breakdown(shell, capsys):
    shell.run_line_magic("nbtune", "estimate nbtune:tiny --method lora --batch 4 --seq 64 --gpu t4")
    out = capsys.readouterr().out
    assert "Memory estimate" in out and "fits on NVIDIA T4" in out
    shell.run_line_magic("nbtune", "estimate nbtune:tiny --batch zero")
    assert "invalid int value: 'zero'" in capsys.readouterr().out


def test_cell_magic_reports_every_problem_of_the_yaml(shell, capsys):
    shell.run_cell_magic("nbtune", "", "training: {micro_batch_size: 0, learning_rate: -1}\n")
    out = capsys.readouterr().out
    assert "training.micro_batch_size" in out and "training.learning_rate" in out


def test_runs_magic_lists_the_store_and_cell_magic_launches(shell, capsys, tmp_path: Path):
    shell.run_line_magic("nbtune", f"runs --store {tmp_path}")
    assert "No runs" in capsys.readouterr().out
    shell.run_cell_magic("nbtune", f"--store {tmp_path} --wait --name run", tiny().to_yaml())
    run = shell.user_ns["run"]
    assert run.status == "finished"
    capsys.readouterr()
    shell.run_line_magic("nbtune", f"runs --store {tmp_path}")
    out = capsys.readouterr().out
    assert run.id in out and "finished" in out
    shell.run_line_magic("nbtune", f"compare {run.id} --store {tmp_path}")
    assert "lora" in capsys.readouterr().out


def test_html_fallback_of_a_chart_renders_with_a_named_template():
    # The static record falls back to HTML when no PNG can be made; a template given by name must not break it.
    from nbtune.widgets.charts import figure_html

    html = figure_html({"data": [{"type": "scatter", "x": [1, 2], "y": [3, 4]}], "layout": {"template": "plotly_white"}})
    assert "plotly" in html and "[1,2]" in html.replace(" ", "")


def test_the_builder_shows_what_the_precision_becomes_here_and_why(monkeypatch):
    monkeypatch.setenv("NBTUNE_CPU_BF16", "0")  # a CPU that emulates bf16
    b = Builder(TuneConfig(), debounce_s=NEVER)
    assert "fp32: this CPU has no native bf16" in b.precision_note.value and "7x slower" in b.precision_note.value
    b.apply({"training.precision": "bf16"})
    assert "bf16 as chosen: this CPU emulates it" in b.precision_note.value


def test_an_estimate_right_after_the_builder_appears_waits_for_its_background_imports() -> None:
    """The builder imports transformers on a background thread; a cell that estimates at the same moment
    must get its estimate, not "cannot import name 'AutoConfig' from 'transformers'" (seen in the quickstart)."""
    import subprocess
    import sys

    script = ("import nbtune\nfrom nbtune.widgets.builder import Builder\n"
              "builder = Builder(nbtune.TuneConfig())\nbuilder.load_in_background()\n"
              "print('total', nbtune.estimate_memory(builder.config, gpu='t4').total_bytes)\n"
              "builder.wait_loaded(120)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split("total")[-1]) > 0
