"""RL from rewards with `training.stage: grpo` (TRL's GRPOTrainer): it trains through `training.execute` with the
built-in rewards or one the user writes in Python, reports the reward metrics as step events and the held-out
exact match of greedy answers as `accuracy`, composes with prompt tuning, retrains when a user reward's code
changes, and refuses unknown rewards and batches of partial groups before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import nbtune
from nbtune import rewards
from nbtune.config import ConfigError, TuneConfig
from nbtune.events import EventStream

CHAT = [json.loads(line) for line in
        (Path(nbtune.__file__).parent / "embedded/data/chat/train.jsonl").read_text().splitlines()]


def grpo(method: str = "lora", **training: object) -> TuneConfig:
    return TuneConfig(method=method, data={"source": "nbtune:chat", "max_samples": 16, "max_eval_samples": 3},
                      training={"stage": "grpo", "micro_batch_size": 4, "num_generations": 2, "max_steps": 2,
                                "log_every": 1, "eval_every": None, "max_completion_length": 12, **training})


def execute(config: TuneConfig, tmp_path) -> tuple[object, list[dict], list[dict]]:
    from nbtune.training import execute as run

    events = EventStream()
    summary = run(config, tmp_path / "run", events)
    history = events.history
    return summary, [e.data for e in history if e.kind == "step"], [e.data for e in history if e.kind == "eval"]


@pytest.mark.slow
def test_a_user_reward_sees_the_completions_and_references_and_its_values_reach_the_step_events(tmp_path):
    received: list[dict] = []

    @nbtune.reward
    def quarter_per_word(completions, reference, **columns):
        received.append({"completions": completions, "reference": reference, **columns})
        return [0.25 * len(c.split()) for c in completions]

    summary, steps, evals = execute(grpo(rewards=["quarter_per_word"]), tmp_path)
    assert summary.state == "finished"
    assert len(steps) == 2 and {"reward", "reward_std", "completion_length"} <= steps[0].keys()
    train_calls = [c for c in received if len(c["completions"]) == 4]  # 2 prompts x 2; an eval answers 3
    for call, step in zip(train_calls, steps, strict=True):
        assert len(call["completions"]) == 4 and all(isinstance(c, str) for c in call["completions"])
        answers = {row["country"]: row["answer"] for row in CHAT[:16]}
        assert call["reference"] == [answers[country] for country in call["country"]]  # each row's own answer
        assert call["reference"][0] == call["reference"][1]  # 2 completions of one prompt, then the next
        words = [0.25 * len(c.split()) for c in call["completions"]]
        assert step["reward"] == pytest.approx(sum(words) / 4)
    assert [e["step"] for e in evals] == [0, 2]  # the base, then the trained model: greedy, once per prompt
    assert evals[-1]["reward"] == pytest.approx(
        sum(0.25 * len(c.split()) for c in received[-1]["completions"]) / 3)
    assert 0.0 <= evals[-1]["accuracy"] <= 1.0 and "perplexity" not in evals[-1]


@pytest.mark.slow
def test_grpo_with_the_built_in_rewards_evaluates_the_held_out_exact_match(tmp_path):
    config = grpo(rewards=["format", "exact-match"], eval_every=2, beta=0.04)  # beta > 0: KL against the base
    summary, steps, evals = execute(config, tmp_path)
    assert summary.state == "finished"
    assert "kl" in steps[-1] and steps[-1]["kl"] >= 0
    assert [e["step"] for e in evals] == [0, 2]
    assert summary.base_eval_accuracy == 0.0  # the untuned base answers no held-out question exactly
    assert (tmp_path / "run" / "artifact" / "adapter_config.json").exists()


@pytest.mark.slow
def test_prompt_tuning_composes_with_grpo_and_learns_from_the_reward(tmp_path):
    @nbtune.reward(name="short")
    def shorter_is_better(completions, reference, **columns):
        return [-len(c) / 40 for c in completions]

    summary, steps, _ = execute(grpo("prompt-tuning", rewards=["short"], max_steps=3), tmp_path)
    assert summary.state == "finished"
    assert any(s["grad_norm"] > 0 for s in steps)  # the reward reaches the virtual tokens
    adapter = json.loads((tmp_path / "run" / "artifact" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING"


def test_editing_a_user_reward_retrains_and_other_stages_ignore_the_rewards():
    def mine(completions, reference, **columns):
        return [1.0 for _ in completions]

    rewards.register(mine)
    first = grpo(rewards=["mine"]).content_hash

    def mine(completions, reference, **columns):  # noqa: F811  (the same cell, edited and run again)
        return [float(len(c) < 20) for c in completions]

    rewards.register(mine)
    assert grpo(rewards=["mine"]).content_hash != first
    assert grpo(rewards=["exact-match"]).content_hash != grpo(rewards=["format"]).content_hash
    sft = TuneConfig(data={"source": "nbtune:chat"})
    assert sft.replace(**{"training.rewards": ["format"]}).content_hash == sft.content_hash


def test_unknown_rewards_and_partial_groups_are_refused_naming_the_field():
    with pytest.raises(ConfigError) as err:
        grpo(rewards=["exact_match"])
    message = err.value.for_field("training.rewards")
    assert "'exact_match'" in message and "exact-match" in message and "nbtune.reward" in message
    with pytest.raises(ConfigError) as err:
        grpo(micro_batch_size=6, num_generations=4)
    message = err.value.for_field("training.num_generations")
    assert "training.micro_batch_size" in message and "gradient_accumulation_steps" in message
    grpo(micro_batch_size=2, gradient_accumulation_steps=2, num_generations=4)  # 4 completions a step: one group
    with pytest.raises(ValueError, match="built-in"):
        rewards.register(lambda completions, reference, **c: [], name="format")


def test_a_reward_returning_the_wrong_thing_is_named_in_the_error():
    @nbtune.reward
    def too_few(completions, reference, **columns):
        return [1.0]

    @nbtune.reward
    def words(completions, reference, **columns):
        return ["good" for _ in completions]

    with pytest.raises(ValueError, match="reward 'too_few' returned 1 values for 2 completions"):
        rewards.scored("too_few", ["a", "b"], ["a", "b"])
    with pytest.raises(TypeError, match="reward 'words' must return numbers.*'good'"):
        rewards.scored("words", ["a", "b"], ["a", "b"])


def test_the_built_in_rewards_score_the_embedded_answers():
    ref = ["The capital of Lonora is Futhheim."]
    assert rewards.exact_match(["  the capital of lonora  is Futhheim"], ref) == [1.0]
    assert rewards.exact_match(["The capital of Lonora is Futhheim. Yes."], ref) == [0.0]
    assert rewards.answer_form(["The capital of Zasland is Tronburg.", "People in Zasland speak Glamic.",
                                "The capital of Zasland is Tronburg", "cherry is a country."], ref * 4) == [
        1.0, 1.0, 0.0, 0.0]
    assert rewards.contains_answer(["It is Futhheim.", "It is Futh."], ref * 2) == [1.0, 0.0]


def test_chat_rows_become_prompts_up_to_the_last_assistant_turn():
    from nbtune.stage_grpo import example

    row = {"country": "Lonora", "answer": "The capital of Lonora is Futhheim.", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Lonora?"}, {"role": "assistant", "content": "Futhheim."}]}
    shown = example("chat", row)
    assert shown["prompt"] == row["messages"][:3]
    assert shown["reference"] == row["answer"] and shown["country"] == "Lonora"
    assert example("chat", {"messages": row["messages"]})["reference"] == "Futhheim."
    plain = example("prompt-reference", {"prompt": "2 + 2 =", "solution": "4", "level": 1})
    assert plain == {"prompt": "2 + 2 =", "reference": "4", "level": 1}


def test_the_sampling_temperature_reaches_trl_and_only_grpo_reads_it(tmp_path):
    from nbtune import stage_grpo
    from nbtune.training import _shared_arguments

    config = grpo(temperature=0.7)
    args = stage_grpo.arguments(config, _shared_arguments(config, tmp_path, True, "fp32", False, "standard"))
    assert args.temperature == 0.7
    assert config.content_hash != grpo().content_hash
    sft = TuneConfig(data={"source": "nbtune:chat"})
    assert sft.replace(**{"training.temperature": 0.7}).content_hash == sft.content_hash
    with pytest.raises(ConfigError, match=r"training.temperature must be .*\(got 0\)"):
        grpo(temperature=0)


class RecordPromptLengths:
    """A TrainerCallback that records the prompt length of every generate call (sampling and greedy answers)."""

    def __init__(self):
        self.lengths: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        generate = model.generate

        def recorded(*a, **k):
            self.lengths.append(k["input_ids"].shape[1])
            return generate(*a, **k)
        model.generate = recorded


@pytest.mark.slow
def test_prompts_longer_than_max_length_keep_their_last_tokens_and_the_run_says_how_many(tmp_path):
    from transformers import TrainerCallback

    from nbtune.training import execute as run

    record = type("Record", (RecordPromptLengths, TrainerCallback), {})()
    events = EventStream()
    config = grpo(rewards=["format"], max_steps=1, eval_every=1).replace(**{"data.max_length": 8})
    summary = run(config, tmp_path / "run", events, extra_callbacks=[record])
    assert summary.state == "finished"
    assert record.lengths and max(record.lengths) == 8  # the sampled groups and the held-out greedy answers
    assert summary.data["truncated"] == summary.data["train_rows"] == 16  # every chat prompt is over 8 tokens
