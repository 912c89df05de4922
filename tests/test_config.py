"""The configuration users write: defaults, validation, YAML/JSON round trips and the content hash."""

from __future__ import annotations

import json

import pytest
import yaml

from nbtune import ConfigError, TuneConfig


def test_default_config_is_complete_and_valid():
    config = TuneConfig()
    assert config.model.name_or_path == "nbtune:tiny"
    assert config.data.source == "nbtune:capitals"
    assert config.problems() == []
    assert config.learning_rate > 0  # the method's recommended rate when none is set


def test_yaml_and_json_round_trip_unchanged():
    config = TuneConfig(method={"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
                        training={"learning_rate": 2e-4, "max_steps": 10, "optimizer": "sgd"})
    assert TuneConfig.from_yaml(config.to_yaml()) == config
    assert TuneConfig.from_json(config.to_json()) == config
    assert TuneConfig.from_yaml(config.to_yaml()).content_hash == config.content_hash


def test_yaml_reads_naturally():
    text = """
model:    {name_or_path: nbtune:tiny, task: causal-lm, dtype: bf16}
method:   {name: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}
data:     {source: nbtune:capitals, max_length: 64}
training: {learning_rate: 2.0e-4, max_steps: 200, micro_batch_size: 8, optimizer: adamw, precision: bf16}
"""
    config = TuneConfig.from_yaml(text)
    assert config.method.name == "lora" and config.method.params["r"] == 16
    assert config.training.max_steps == 200 and config.model.dtype == "bf16"


def test_hash_ignores_key_order_and_written_out_defaults():
    sparse = TuneConfig(method="lora")
    explicit = TuneConfig.from_dict(json.loads(json.dumps(TuneConfig(method="lora").to_dict(resolved=True))))
    shuffled = TuneConfig.from_dict(dict(reversed(list(sparse.to_dict().items()))))
    assert sparse.content_hash == explicit.content_hash == shuffled.content_hash
    assert TuneConfig(method={"name": "lora", "r": 4}).content_hash != sparse.content_hash


def test_all_problems_are_reported_together_with_field_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        TuneConfig(method={"name": "lora", "r": 0}, training={"learning_rate": -1e-4, "optimizer": "adam"},
                   model={"task": "translation"})
    err = info.value
    fields = {name for name, _ in err.problems}
    assert {"method.r", "training.learning_rate", "training.optimizer", "model.task"} <= fields
    message = err.for_field("training.learning_rate")
    assert "-0.0001" in message and "> 0" in message
    assert "adamw" in err.for_field("training.optimizer")  # says what is allowed


def test_unknown_fields_and_methods_are_named():
    with pytest.raises(ConfigError) as info:
        TuneConfig.from_dict({"training": {"lr": 1e-3}, "method": {"name": "magic"}})
    text = str(info.value)
    assert "training.lr" in text and "learning_rate" in text
    with pytest.raises(ConfigError, match="method.name"):
        TuneConfig(method="magic")


def test_method_parameters_are_checked_against_the_registry():
    with pytest.raises(ConfigError, match="method.rank is not a parameter of lora"):
        TuneConfig(method={"name": "lora", "rank": 8})


def test_replace_changes_dotted_fields_and_switches_method():
    config = TuneConfig(method={"name": "lora", "r": 8})
    changed = config.replace(**{"training.micro_batch_size": 2, "method.r": 4})
    assert changed.training.micro_batch_size == 2 and changed.method.params["r"] == 4
    switched = changed.replace(method="full")
    assert switched.method.name == "full" and switched.method.params == {}
    reset = changed.replace(**{"method.params": {"alpha": 8}})  # all parameters at once: r back to its default
    assert reset.method.params == {"alpha": 8} and reset.method_params["r"] == TuneConfig().method_params["r"]


def test_dataframe_source_becomes_rows():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    config = TuneConfig(model={"task": "seq-cls"}, data={"source": frame, "label_column": "label"})
    assert config.data.source == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    assert "2 rows, fingerprint" in yaml.safe_load(config.to_yaml())["data"]["source"]  # named, not copied


def test_code_export_rebuilds_the_same_config():
    config = TuneConfig(method={"name": "lora", "r": 4}, training={"max_steps": 7})
    namespace: dict = {}
    exec(config.to_code().replace("run = nbtune.launch(config)", ""), namespace)
    assert namespace["config"] == config


def test_switching_method_by_name_keeps_shared_parameters():
    config = TuneConfig(method={"name": "lora", "r": 8, "use_dora": True})
    switched = config.replace(**{"method.name": "qlora"})
    assert switched.method.name == "qlora" and switched.method.params["r"] == 8
    assert config.replace(**{"method.name": "ia3"}).method.params == {}  # ia3 has no rank


def test_every_section_field_states_its_help_and_validation_enforces_its_stated_range():
    from nbtune.config import section_fields

    for section in ("model", "data", "training"):
        for f in section_fields(section):
            assert f.help.strip(), f"{section}.{f.name} has no help"
            if f.low is None:
                continue
            below = f.low - 1 if f.kind == "int" else f.low - 0.5
            with pytest.raises(ConfigError) as info:
                TuneConfig(**{section: {f.name: below}})
            assert info.value.for_field(f"{section}.{f.name}").endswith(f"(got {below!r})")
            TuneConfig(**{section: {f.name: f.low if f.kind == "int" else (f.high or f.low + 1) * 0.5}})


def test_choice_fields_offer_exactly_what_validation_accepts():
    from nbtune.config import section_fields

    optimizer = next(f for f in section_fields("training") if f.name == "optimizer")
    assert optimizer.kind == "choice" and "adamw" in optimizer.choices
    for choice in optimizer.choices:
        assert TuneConfig(training={"optimizer": choice}).training.optimizer == choice
    with pytest.raises(ConfigError, match="training.optimizer must be one of adamw"):
        TuneConfig(training={"optimizer": "adam"})


def test_cache_keys_of_configs_without_the_image_options_are_those_of_before_the_options_existed():
    # hashes computed by the nbtune of 0b237bb^ (before data.image_column), so its stored runs are found again
    assert TuneConfig().content_hash == "474bec3bcf65641d"
    classifier = TuneConfig(method={"name": "lora", "r": 4}, data={"source": "nbtune:regions"},
                            model={"task": "seq-cls"})
    assert classifier.content_hash == "232baefc116dfd1e"
    assert TuneConfig(model={"task": "image-cls"}, data={"augment": "flip"}).content_hash != TuneConfig(
        model={"task": "image-cls"}).content_hash
