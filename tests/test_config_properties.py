"""Properties of the config over generated values (hypothesis): any value of any field validates or is a
ConfigError naming that field; YAML and JSON round trips are the identity; the content hash is stable."""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbtune import ConfigError, TuneConfig
from nbtune.config import section_fields
from nbtune.methods import registry

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = [(section, f) for section in ("model", "data", "training") for f in section_fields(section)]
METHOD_FIELDS = [(m, f) for m in ("lora", "ia3", "prompt-tuning", "freeze") for f in registry.get(m).fields]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
                    st.sampled_from(["1e-4", "auto", "", "nbtune:capitals", "0.1", "inf"]))
anything = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


@FAST
@given(st.sampled_from(FIELDS), anything)
def test_any_value_of_a_section_field_validates_or_names_that_field(field, value):
    section, f = field
    dotted = f"{section}.{f.name}"
    try:
        config = TuneConfig(**{section: {f.name: value}})
    except ConfigError as err:
        assert {name for name, _ in err.problems} == {dotted}, err.problems
        assert dotted in str(err)
    else:
        assert TuneConfig.from_yaml(config.to_yaml()) == config


@FAST
@given(st.sampled_from(METHOD_FIELDS), anything)
def test_any_value_of_a_method_parameter_validates_or_names_that_parameter(field, value):
    method, f = field
    try:
        config = TuneConfig(method={"name": method, f.name: value})
    except ConfigError as err:
        assert {name for name, _ in err.problems} == {f"method.{f.name}"}, err.problems
    else:
        assert TuneConfig.from_json(config.to_json()) == config


def _valid_value(section_field: tuple[str, object]) -> st.SearchStrategy:
    """Values the field's description allows (validation may still refuse a few, e.g. an empty split)."""
    _, f = section_field
    if f.choices:
        return st.sampled_from(f.choices)
    if f.kind == "bool":
        return st.booleans()
    if f.kind == "int":
        return st.integers(int(f.low if f.low is not None else 0), int(f.high if f.high is not None else 10**6))
    if f.kind == "float":
        return st.floats(f.low if f.low is not None else 0, f.high if f.high is not None else 10.0,
                         exclude_min=f.low == 0 and f.name in ("learning_rate", "epochs"), exclude_max=f.high == 1 and
                         f.name in ("warmup_ratio", "dropout"))
    if f.kind == "str-or-float":
        return st.one_of(st.floats(0.01, 0.5), st.text(min_size=1, max_size=10).filter(str.strip))
    return st.text(max_size=20)


@st.composite
def valid_configs(draw: st.DrawFn) -> TuneConfig:
    chosen = draw(st.lists(st.sampled_from([x for x in FIELDS if x[1].name not in ("name_or_path", "source")]),
                           max_size=6, unique_by=lambda x: (x[0], x[1].name)))
    sections: dict[str, dict] = {"model": {}, "data": {}, "training": {}}
    for section, f in chosen:
        sections[section][f.name] = draw(_valid_value((section, f)))
    sections["method"] = {"name": draw(st.sampled_from(["lora", "ia3", "full"])),
                          **({"r": draw(st.integers(1, 64))} if draw(st.booleans()) else {})}
    if sections["method"]["name"] != "lora":
        sections["method"].pop("r", None)
    try:
        return TuneConfig.from_dict(sections)
    except ConfigError:
        return TuneConfig()


@FAST
@given(valid_configs())
def test_yaml_and_json_round_trips_are_the_identity(config):
    assert TuneConfig.from_yaml(config.to_yaml()) == config
    assert TuneConfig.from_json(config.to_json()) == config
    assert TuneConfig.from_yaml(config.to_yaml()).content_hash == config.content_hash


@FAST
@given(valid_configs(), st.randoms(use_true_random=False))
def test_the_hash_ignores_key_order_and_written_out_defaults(config, rnd: random.Random):
    def shuffled(value: object) -> object:
        if isinstance(value, dict):
            items = list(value.items())
            rnd.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        return value

    explicit = TuneConfig.from_dict(json.loads(json.dumps(config.to_dict(resolved=True))))
    reordered = TuneConfig.from_dict(shuffled(config.to_dict()))
    assert explicit.content_hash == reordered.content_hash == config.content_hash
