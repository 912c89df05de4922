"""Bad input gets a clear error before training (issue 11, problems 8 and 9): each test is a case the probe found,
and the error names the field or file (and line), the bad value and what is allowed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from nbtune import ConfigError, TuneConfig
from nbtune.cli import main
from nbtune.data import DataFileError, load_rows, prepare

ROWS = [{"q": f"question {i}", "a": f" {i}"} for i in range(10)]


def rows_config(**data: object) -> TuneConfig:
    return TuneConfig(data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", **data},
                      training={"max_steps": 1})


# ----- numbers ------------------------------------------------------------------------------------------------

def test_yaml_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads `1e-4` as text; it was refused as "(got '1e-4')"
    config = TuneConfig.from_yaml("training: {learning_rate: 1e-4, weight_decay: 1E-2}\nmethod: {name: lora, alpha: 3e1}")
    assert config.training.learning_rate == 1e-4 and config.training.weight_decay == 0.01
    assert config.method.params["alpha"] == 30.0


def test_text_that_looks_like_an_exponent_stays_text_through_yaml():
    config = rows_config(text_column="1e5", prompt_template=None)
    assert TuneConfig.from_yaml(config.to_yaml()).data.text_column == "1e5"


def test_a_quoted_number_says_to_write_it_without_quotes():
    with pytest.raises(ConfigError) as info:
        TuneConfig.from_yaml('training: {learning_rate: "1e-4"}')
    assert "without quotes" in info.value.for_field("training.learning_rate")


@pytest.mark.parametrize(("section", "name", "value"), [
    ("training", "epochs", math.inf), ("training", "max_grad_norm", math.inf),
    ("training", "learning_rate", math.nan), ("training", "warmup_ratio", math.nan),
])
def test_infinite_and_nan_numbers_are_refused_naming_the_field(section, name, value):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**{section: {name: value}})
    message = info.value.for_field(f"{section}.{name}")
    assert "finite" in message or "must be" in message
    assert message.endswith(f"(got {value!r})")


def test_a_nan_lora_alpha_is_refused_at_validation():
    # it ended as "the training loss became nan; lower the learning rate"
    with pytest.raises(ConfigError) as info:
        TuneConfig(method={"name": "lora", "alpha": math.nan})
    assert info.value.for_field("method.alpha") == "method.alpha must be a finite number (got nan)"


def test_seed_must_fit_in_32_bits():
    assert TuneConfig(training={"seed": 2**32 - 1}).training.seed == 2**32 - 1
    with pytest.raises(ConfigError) as info:
        TuneConfig(training={"seed": 2**32})
    assert info.value.for_field("training.seed") == (
        "training.seed must be an integer between 0 and 4294967295 (got 4294967296)")


@pytest.mark.parametrize(("section", "values", "field"), [
    ("data", {"prompt_template": 3}, "data.prompt_template"),  # was TypeError: argument of type 'int'...
    ("data", {"split": 3}, "data.split"),
    ("data", {"eval_split": 1}, "data.eval_split"),  # an integer 1 was taken as a split name
    ("model", {"revision": 3}, "model.revision"),
    ("method", {"name": "lora", "params": [8]}, "method.params"),  # was TypeError from dict()
])
def test_values_of_the_wrong_type_are_config_errors_naming_the_field(section, values, field):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**{section: values})
    assert [f for f, _ in info.value.problems] == [field]


# ----- data ---------------------------------------------------------------------------------------------------

def test_a_split_name_the_source_lacks_is_reported_against_eval_split():
    with pytest.raises(ConfigError) as info:
        load_rows(TuneConfig(data={"eval_split": "validation"}))
    assert info.value.problems[0][0] == "data.eval_split"
    assert "train, eval" in info.value.problems[0][1] and "'validation'" in info.value.problems[0][1]


def test_a_split_name_a_dataset_folder_lacks_is_reported_against_eval_split(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ConfigError) as info:  # was datasets' ValueError 'Unknown split', naming no field
        load_rows(TuneConfig(data={"source": str(tmp_path), "eval_split": "validation"}))
    assert info.value.for_field("data.eval_split").startswith(f"data.eval_split 'validation' is not a split of {tmp_path}")


def test_an_eval_fraction_that_leaves_too_little_training_data_is_refused():
    with pytest.raises(ConfigError) as info:
        load_rows(rows_config(eval_split=0.9))
    assert info.value.for_field("data.eval_split").startswith(
        "data.eval_split 0.9 holds out 9 of 10 rows and leaves 1 for training")
    train, evaluation = load_rows(rows_config(eval_split=0.5))
    assert (len(train), len(evaluation)) == (5, 5)


@pytest.fixture(scope="module")
def tokenizer():
    from nbtune import models

    return models.load_tokenizer(TuneConfig())


def test_prompts_longer_than_max_length_are_counted_and_refused(tokenizer):
    long_rows = [{"q": "word " * 40, "a": " yes"}] * 3 + ROWS
    config = TuneConfig(data={"source": long_rows, "prompt_template": "{q}", "target_column": "a",
                              "max_length": 16, "eval_split": 0.2})
    with pytest.raises(ConfigError) as info:
        prepare(config, tokenizer)
    message = info.value.for_field("data.max_length")
    assert message.startswith("data.max_length 16 leaves no target tokens in 3 of 13 rows")
    assert "raise data.max_length above" in message and "data.prompt_template" in message
    prepare(config.replace(**{"data.max_length": 128}), tokenizer)  # room for the targets: accepted


def test_a_launch_with_truncated_targets_fails_naming_max_length_not_nan(store):
    from nbtune import launch

    config = TuneConfig(data={"source": [{"q": "word " * 40, "a": " yes"}] * 8, "prompt_template": "{q}",
                              "target_column": "a", "max_length": 16, "eval_split": 0.25},
                        training={"max_steps": 2})
    run = launch(config, store=store).wait(120)
    assert run.status == "failed"
    assert "data.max_length 16 leaves no target tokens" in run.summary.error and "nan" not in run.summary.error


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_a_csv_row_with_too_many_fields_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "reviews.csv", "text,label\ngood,pos\nbad, awful,neg\n")
    with pytest.raises(DataFileError) as info:
        load_rows(TuneConfig(model={"task": "seq-cls"}, data={"source": str(path), "label_column": "label",
                                                               "eval_split": 0.5}))
    assert (info.value.path, info.value.line) == (path, 3)
    assert "3 fields where the header names 2 columns" in str(info.value)


def test_a_csv_with_an_unclosed_quote_names_the_file(tmp_path):
    path = write(tmp_path, "reviews.csv", 'text,label\n"good,pos\n')
    with pytest.raises(DataFileError, match="reviews.csv:2: not valid CSV"):
        load_rows(TuneConfig(data={"source": str(path), "eval_split": 0.5}))


def test_a_broken_parquet_file_names_the_file(tmp_path):
    path = write(tmp_path, "rows.parquet", b"PAR1 not really")
    with pytest.raises(DataFileError, match="rows.parquet: not a readable parquet file"):
        load_rows(TuneConfig(data={"source": str(path), "eval_split": 0.5}))


def test_the_cli_names_file_and_line_of_a_broken_csv_without_a_traceback(tmp_path, capsys):
    data = write(tmp_path, "rows.csv", "text,target\nhello, world,x\n")
    config = write(tmp_path, "c.yaml", f"data: {{source: {data}, eval_split: 0.5}}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"nbtune: {data}:2: 3 fields" in err and "Traceback" not in err


# ----- YAML bounds --------------------------------------------------------------------------------------------

BOMB = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BOMB


def test_a_yaml_alias_bomb_is_refused_fast_naming_the_file(tmp_path, capsys):
    path = write(tmp_path, "bomb.yaml", "data:\n  source:\n  - {" + ", ".join(BOMB.splitlines()) + "}\n")
    assert path.stat().st_size < 700
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 5  # was over a minute
    err = capsys.readouterr().err
    assert f"nbtune: {path}" in err and "aliases" in err and "MAX_YAML_VALUES" in err


def test_yaml_that_refers_to_itself_or_is_too_large_is_refused():
    from nbtune.config import MAX_YAML_BYTES

    with pytest.raises(ConfigError, match="aliases"):
        TuneConfig.from_yaml("data: &d {source: [*d]}\n")
    with pytest.raises(ConfigError, match="MAX_YAML_BYTES"):
        TuneConfig.from_yaml("#" * (MAX_YAML_BYTES + 1) + "\n")


# ----- against the model (preflight, before any weights load) ----------------------------------------------------

def test_a_lora_rank_larger_than_the_layers_is_refused():
    from nbtune import preflight

    preflight.check(TuneConfig(method={"name": "lora", "r": 192}))  # the embedded model's q_proj is 192 x 192
    with pytest.raises(ConfigError) as info:
        preflight.check(TuneConfig(method={"name": "lora", "r": 256}))
    message = info.value.for_field("method.r")
    assert message.startswith("method.r must be <= 192") and message.endswith("(got 256)")


def test_max_length_above_the_models_positions_is_refused():
    from nbtune import preflight

    with pytest.raises(ConfigError) as info:
        preflight.check(TuneConfig(data={"max_length": 4096}))
    assert info.value.for_field("data.max_length") == (
        "data.max_length must be <= 128, the positions nbtune:tiny was trained for (got 4096)")


def test_a_hub_id_fails_fast_when_offline(offline, store):
    from nbtune import launch

    started = time.perf_counter()
    run = launch(TuneConfig(model={"name_or_path": "nbtune-tests/not-downloaded"}), store=store).wait(60)
    assert time.perf_counter() - started < 15  # transformers retried for ~26-40 s
    assert run.status == "failed"
    assert "HF_HUB_OFFLINE=1" in run.summary.error and "local folder" in run.summary.error


def test_a_model_folder_that_does_not_exist_is_named():
    from nbtune import preflight

    with pytest.raises(ConfigError, match="model.name_or_path './no/such/model': no such model folder"):
        preflight.check(TuneConfig(model={"name_or_path": "./no/such/model"}))


def test_fp16_on_a_cpu_warns_that_it_trains_in_fp32():
    from nbtune import precision

    choice = precision.choose_precision("fp16", precision.cpu_device(env={"NBTUNE_CPU_BF16": "0"}))
    assert choice.value == "fp32" and "trains in fp32" in choice.warning


# ----- trackers and extra TrainingArguments (issue 16) -----------------------------------------------------

def test_a_tracker_that_is_not_installed_or_unknown_is_named_before_loading():
    from nbtune import preflight

    config = TuneConfig(training={"report_to": ["wandb", "tensorbored"], "max_steps": 1})
    with pytest.raises(ConfigError) as info:
        preflight.check(config)
    text = str(info.value)
    assert "training.report_to names 'tensorbored', which transformers does not know" in text
    assert "tensorboard" in text  # what is allowed
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert "'wandb', which is not installed here (pip install wandb)" in text


def test_extra_training_arguments_are_checked_against_the_installed_transformers():
    from nbtune import preflight

    config = TuneConfig(training={"max_steps": 1, "extra_arguments": {
        "torch_empty_cache_steps": 10, "lerning_rate": 1.0, "per_device_train_batch_size": 2}})
    with pytest.raises(ConfigError) as info:
        preflight.check(config)
    text = str(info.value)
    assert "'lerning_rate', which the installed transformers' TrainingArguments does not have" in text
    assert "'per_device_train_batch_size', which nbtune sets from its own fields (training.micro_batch_size)" in text
    assert "torch_empty_cache_steps" not in text  # a real argument nbtune does not set passes


def test_extra_arguments_must_be_a_mapping_and_trackers_do_not_change_the_cache_key():
    with pytest.raises(ConfigError, match=r"training.extra_arguments must be a mapping of names to values \(got"):
        TuneConfig(training={"extra_arguments": ["torch_empty_cache_steps"]})
    assert TuneConfig(training={"report_to": ["tensorboard"]}).content_hash == TuneConfig().content_hash
    assert TuneConfig(training={"extra_arguments": {"torch_empty_cache_steps": 4}}).content_hash != \
        TuneConfig().content_hash


def test_extra_arguments_reach_the_trainer(store):
    from transformers import TrainerCallback

    import nbtune

    seen = {}

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            seen["steps"], seen["batch"] = args.torch_empty_cache_steps, args.per_device_train_batch_size

    run = nbtune.launch(TuneConfig(training={"max_steps": 2, "eval_every": None, "micro_batch_size": 4,
                                            "extra_arguments": {"torch_empty_cache_steps": 7}}),
                        store=store, callbacks=[Seen()])
    run.wait()
    assert run.status == "finished", run.error
    assert seen == {"steps": 7, "batch": 4}


def test_the_builder_is_not_ready_with_an_argument_transformers_lacks():
    from nbtune import preflight

    blockers = preflight.readiness(TuneConfig(training={"extra_arguments": {"lerning_rate": 1.0}}))
    assert [b.field for b in blockers] == ["training.extra_arguments"]
    assert preflight.readiness(TuneConfig(training={"extra_arguments": {"torch_empty_cache_steps": 4}})) == []
