"""Preference tuning with `training.stage: dpo` (TRL's DPOTrainer): it learns held-out preferences the base does
not have, composes with the methods the registry says it does, reports its rewards as events, caches like every
run, and refuses what it cannot train before any weights load."""

from __future__ import annotations

import json

import pytest

import nbtune
from nbtune import stages
from nbtune.config import ConfigError, TuneConfig
from nbtune.methods import registry

PAIRS = [{"prompt": f"What is {i} plus 1?", "chosen": f" {i + 1}", "rejected": " I do not know."} for i in range(12)]


def dpo(method: str = "lora", source: object = "nbtune:prefs", **training: object) -> TuneConfig:
    return TuneConfig(method=method, data={"source": source},
                      training={"stage": "dpo", "micro_batch_size": 8, "log_every": 5, **training})


def steps_and_evals(run: nbtune.Run) -> tuple[list[dict], list[dict]]:
    history = run.events.history
    return [e.data for e in history if e.kind == "step"], [e.data for e in history if e.kind == "eval"]


@pytest.mark.slow
def test_dpo_with_lora_learns_the_held_out_preference_the_base_lacks(store):
    run = nbtune.launch(dpo(max_steps=100, eval_every=100), store=store).wait()
    summary = run.summary
    assert summary.state == "finished", summary.error
    assert 0.3 <= summary.base_eval_accuracy <= 0.7  # nbtune:prefs has no prior (tests/test_preference.py)
    assert summary.final_eval_accuracy >= 0.9, summary.final_eval_accuracy  # the issue asks 0.9
    steps, evals = steps_and_evals(run)
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert {"reward_chosen", "reward_rejected", "reward_accuracy"} <= steps[-1].keys()
    assert "perplexity" not in evals[-1]  # a DPO loss is no token cross-entropy
    adapter = json.loads((run.artifact_path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"  # the artifact is a plain PEFT adapter


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt-tuning", "ia3", "full"])
def test_dpo_composes_with_other_methods(store, method):
    run = nbtune.launch(dpo(method, source=PAIRS, max_steps=3, eval_every=None, log_every=1,
                            micro_batch_size=4), store=store).wait()
    assert run.summary.state == "finished", run.summary.error
    steps, evals = steps_and_evals(run)
    assert len(steps) == 3 and all("reward_margin" in s for s in steps)
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0


@pytest.mark.slow
def test_an_identical_dpo_config_is_served_from_the_store(store):
    config = dpo(source=PAIRS, max_steps=2, eval_every=None, micro_batch_size=4)
    first = nbtune.launch(config, store=store).wait()
    again = nbtune.launch(config, store=store).wait()
    assert again.id == first.id and again.cached
    other = nbtune.launch(config.replace(**{"training.beta": 0.5}), store=store).wait()
    assert other.id != first.id and not other.cached


def test_fields_a_stage_does_not_read_leave_its_cache_key_alone():
    sft = TuneConfig()
    assert sft.replace(**{"training.beta": 0.5}).content_hash == sft.content_hash
    assert dpo().replace(**{"training.beta": 0.5}).content_hash != dpo().content_hash
    assert dpo().content_hash != TuneConfig(data={"source": "nbtune:prefs"}, method="lora").content_hash


def test_the_registry_says_which_methods_compose_with_each_stage_and_why_not():
    builtin = {m.name: m for m in registry.all_methods(include_generated=False)}
    table = stages.supported_combinations(builtin)
    assert table[("dpo", "lora")] is None and table[("dpo", "prompt-tuning")] is None
    assert "its own loss" in table[("dpo", "distillation")]
    assert all(table[("sft", m)] is None for m in builtin)
    with pytest.raises(ConfigError) as err:
        dpo("distillation")
    assert "distillation" in err.value.for_field("training.stage")
    with pytest.raises(ConfigError) as err:
        TuneConfig(model={"task": "seq-cls"}, data={"source": "nbtune:sentiment"}, training={"stage": "dpo"})
    assert "causal-lm" in err.value.for_field("training.stage")


def test_data_dpo_cannot_train_is_refused_naming_data_format(tokenizer):
    with pytest.raises(ConfigError) as err:
        dpo(source="nbtune:chat").replace(**{"data.format": "chat"})
    assert "training.stage dpo" in err.value.for_field("data.format")
    detected = dpo(source="nbtune:chat")  # the format is only known from the rows: refused when preparing them
    with pytest.raises(ConfigError) as err:
        stages.for_config(detected).prepare_data(detected, tokenizer)
    assert "set training.stage to sft" in err.value.for_field("data.format")


@pytest.fixture(scope="module")
def tokenizer():
    from nbtune import models

    return models.load_tokenizer(TuneConfig())


def test_a_detected_format_the_stage_cannot_train_keeps_the_builder_from_ready():
    from nbtune import preflight

    blockers = preflight.readiness(dpo(source="nbtune:chat"))  # data.format auto: known only from the rows
    assert [b.field for b in blockers] == ["data.format"] and "set training.stage to sft" in blockers[0].message
    assert not preflight.readiness(dpo())


@pytest.mark.slow
def test_kto_learns_from_the_pairs_unpaired_desirable_and_undesirable_rows_mixed(store):
    run = nbtune.launch(dpo(max_steps=60, eval_every=60).replace(**{"training.stage": "kto"}), store=store).wait()
    summary = run.summary
    assert summary.state == "finished", summary.error
    assert summary.data["train_rows"] == 400  # 200 pairs: each answer a row of its own
    assert summary.final_eval_accuracy >= summary.base_eval_accuracy + 0.1
    steps, _ = steps_and_evals(run)
    assert all("reward_margin" in s for s in steps)  # every logged batch held both kinds of rows
