"""Scoring preference pairs: the held-out "preference accuracy" a preference stage reports."""

from __future__ import annotations

import random

import pytest

from nbtune.embedded import BASE_MODEL_DIR, load_rows
from nbtune.preference import score_pairs


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture(scope="module")
def held_out() -> list[dict]:
    return load_rows("prefs", "eval")


def _swapped(row: dict) -> dict:
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"]}


def test_a_pair_whose_answers_are_the_same_is_a_tie_and_ties_count_as_wrong(base, tokenizer, held_out):
    rows = [{**r, "rejected": r["chosen"]} for r in held_out[:8]]
    scores = score_pairs(base, tokenizer, rows)
    assert scores.n == 8 and scores.margins == (0.0,) * 8
    assert scores.accuracy == 0.0 and scores.mean_margin == 0.0


def test_swapping_chosen_and_rejected_negates_every_margin(base, tokenizer, held_out):
    rows = held_out[:16]
    scores, swapped = score_pairs(base, tokenizer, rows), score_pairs(base, tokenizer, [_swapped(r) for r in rows])
    assert any(abs(m) > 0.1 for m in scores.margins)
    assert list(swapped.margins) == pytest.approx([-m for m in scores.margins], abs=1e-4)
    assert swapped.accuracy == pytest.approx(sum(m < 0 for m in scores.margins) / len(rows))


def test_the_base_has_no_prior_on_the_built_in_preferences(base, tokenizer, held_out):
    # both answers state the right fact; only the reply form the prompt asks for tells them apart
    scores = score_pairs(base, tokenizer, held_out)
    assert scores.n == 100
    assert 0.3 <= scores.accuracy <= 0.7, scores.accuracy


def test_the_right_answer_scores_above_garbage_bytes(base, tokenizer, held_out):
    rng = random.Random(0)
    garbage = "".join(rng.choice("qxzjvkw#%&") for _ in range(12))
    rows = [{**r, "rejected": [{"role": "assistant", "content": garbage}]} for r in held_out[:20]]
    assert score_pairs(base, tokenizer, rows).accuracy >= 0.9


def _summed_logp(model, tokenizer, row: dict, side: str) -> float:
    """An answer's log-probability by another route: the model's own loss on the answer's tokens alone."""
    import torch

    from nbtune.preference import _answer_ids

    ids, scored = _answer_ids(tokenizer, row["prompt"], row[side], "auto")
    labels = torch.tensor([i if s else -100 for i, s in zip(ids, scored, strict=True)])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=labels[None]).loss
    return -loss.item() * (sum(scored[1:]))


@pytest.mark.parametrize("method", ["none", "prompt tuning", "lora"])
def test_scores_are_the_models_log_probabilities_in_batches_of_mixed_lengths(method, tokenizer, held_out):
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    if method == "prompt tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    elif method == "lora":
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lora)
    plain = {"prompt": "Q: What is the capital of Lonora?\nA:", "chosen": " Futhheim", "rejected": " Lonora"}
    with_system = next(r for r in held_out if r["prompt"][0]["role"] == "system")
    two_turns = next(r for r in held_out if len(r["prompt"]) == 3)
    rows = [held_out[0], plain, with_system, two_turns, held_out[1]]
    scores = score_pairs(model, tokenizer, rows, batch_size=2)  # several padded batches
    expected = [_summed_logp(model, tokenizer, r, "chosen") - _summed_logp(model, tokenizer, r, "rejected")
                for r in rows]
    assert list(scores.margins) == pytest.approx(expected, abs=1e-3)
