"""Generations side by side: `Run.generate` (greedy, sampling, beam search), `Run.predict` for classifiers, and
`side_by_side`, the same prompts answered by the base and by every run, kept in the store."""

from __future__ import annotations

import json

import pytest

import nbtune
from nbtune import generation, models
from nbtune.embedded import load_rows
from nbtune.generation import SideBySide, side_by_side
from nbtune.runner import open_run

HELD_OUT = load_rows("capitals", "eval")[:8]  # countries the runs never trained on
PROMPTS = [row["prompt"] for row in HELD_OUT]
CAPITALS = [row["completion"].strip() for row in HELD_OUT]
METHODS = {"lora": 40, "full": 20, "prompt-tuning": 40}  # steps: seconds each on a laptop CPU


@pytest.fixture(scope="module")
def runs(store) -> dict[str, nbtune.Run]:
    trained = {}
    for method, steps in METHODS.items():
        config = nbtune.TuneConfig(method=method, training={"max_steps": steps, "micro_batch_size": 16,
                                                            "eval_every": None, "log_every": 5})
        trained[method] = nbtune.train(config, store=store, progress=False)
        assert trained[method].status == "finished", trained[method].error
    return trained


@pytest.fixture(scope="module")
def table(runs) -> SideBySide:
    return side_by_side(runs, PROMPTS, max_new_tokens=8)


def _fresh(run: nbtune.Run) -> nbtune.Run:
    """A new handle on a stored run: nothing loaded yet."""
    return open_run(run.record)


def test_side_by_side_has_one_row_per_prompt_and_a_column_for_the_base_then_each_run(table, runs):
    assert table.columns == ["base", *runs]
    assert [row["prompt"] for row in table.rows] == PROMPTS
    assert all(set(row) == {"prompt", *table.columns} for row in table.rows)
    frame = table.to_pandas()
    assert frame.shape == (len(PROMPTS), 1 + len(table.columns))
    assert all(isinstance(answer, str) for answers in table.answers.values() for answer in answers)


def test_a_tuned_run_answers_held_out_prompts_differently_from_the_base(table, runs):
    # Measured: LoRA's eval loss fell from 4.63 (the base at step 0) to 0.05 after 40 steps; the base answers
    # these questions with digits (its pre-training text has arithmetic), the tuned run with the capital.
    summary = runs["lora"].summary
    assert summary.final_eval_loss < summary.base_eval_loss / 10
    tuned, base = table.answers["lora"], table.answers["base"]
    assert sum(t != b for t, b in zip(tuned, base, strict=True)) >= 6
    right = [sum(a.strip() == c for a, c in zip(answers, CAPITALS, strict=True)) for answers in (tuned, base)]
    assert right[0] >= 4 and right[0] > right[1]


def test_greedy_answers_are_deterministic_and_do_not_depend_on_the_batch(runs):
    run = runs["lora"]
    first = run.generate(PROMPTS, max_new_tokens=8)
    assert run.generate(PROMPTS, max_new_tokens=8) == first
    # prompts of different lengths share a left-padded batch: each answers as it does alone
    assert [run.generate(p, max_new_tokens=8)[0] for p in PROMPTS[:3]] == first[:3]
    assert not any(answer.startswith("Q:") for answer in first)  # the answer only, not the prompt


def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(runs):
    run = runs["lora"]
    settings = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 8}
    seed0 = run.generate(PROMPTS, seed=0, **settings)
    assert run.generate(PROMPTS, seed=0, **settings) == seed0
    assert run.generate(PROMPTS, seed=1, **settings) != seed0


def test_top_k_and_top_p_reach_the_sampler(runs):
    run = runs["lora"]
    greedy = run.generate(PROMPTS, max_new_tokens=8)
    # keeping only the likeliest token makes sampling greedy, whatever the temperature and seed
    assert run.generate(PROMPTS, do_sample=True, temperature=3.0, top_k=1, seed=7, max_new_tokens=8) == greedy
    assert run.generate(PROMPTS, do_sample=True, temperature=3.0, top_p=1e-6, seed=7, max_new_tokens=8) == greedy


def test_beam_search_runs_and_finds_the_capitals_the_run_learned(runs):
    answers = runs["lora"].generate(PROMPTS, num_beams=3, max_new_tokens=8)
    assert len(answers) == len(PROMPTS)
    assert sum(a.strip() == c for a, c in zip(answers, CAPITALS, strict=True)) >= 4


def test_prompt_tuning_generates_with_its_virtual_tokens(table):
    assert len(table.answers["prompt-tuning"]) == len(PROMPTS)
    assert all(isinstance(a, str) for a in table.answers["prompt-tuning"])


@pytest.mark.parametrize(("settings", "words"), [
    ({"do_sample": True, "temperature": 0}, "temperature must be > 0 when sampling (got 0)"),
    ({"temperature": 0.7}, "temperature applies only when sampling: set do_sample=True"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must be None or in (0, 1] (got 1.5)"),
    ({"do_sample": True, "top_k": 0}, "top_k must be None or an integer >= 1 (got 0)"),
    ({"num_beams": 0}, "num_beams must be an integer >= 1 (got 0)"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1 (got 0)"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"do_sample": "yes"}, "do_sample must be True or False (got 'yes')"),
    ({"temprature": 0.7}, "unknown generation setting 'temprature'; allowed: max_new_tokens"),
])
def test_a_bad_setting_fails_before_any_model_loads_naming_it(runs, no_loading, settings, words):
    for ask in (lambda: _fresh(runs["lora"]).generate(PROMPTS, **settings),
                lambda: side_by_side({"lora": _fresh(runs["lora"])}, PROMPTS, **settings)):
        with pytest.raises(ValueError) as err:
            ask()
        assert words in str(err.value)


def test_asking_for_a_chat_template_the_tokenizer_lacks_fails_before_the_model_loads(runs, no_loading, monkeypatch):
    plain = models.load_tokenizer(nbtune.TuneConfig())
    plain.chat_template = None  # a tokenizer without one
    monkeypatch.setattr(generation, "_tokenizer", lambda run: plain)
    with pytest.raises(ValueError, match="chat_template=True, but the tokenizer of .* has no chat template"):
        _fresh(runs["lora"]).generate(PROMPTS, chat_template=True)


def test_the_chat_template_wraps_prompts_only_for_runs_trained_on_chat(runs):
    tokenizer = models.load_tokenizer(nbtune.TuneConfig())  # the embedded tokenizer has a ChatML-style template
    assert generation.chat_prompts(tokenizer, ["hi"], None) == ["<s>user\nhi</s>\n<s>assistant\n"]
    assert generation.chat_prompts(tokenizer, ["hi"], True) == ["<s>user\nhi</s>\n<s>assistant\n"]
    assert generation.chat_prompts(tokenizer, ["hi"], False) == ["hi"]
    # trained on plain "Q: ...\nA:" prompts (capitals): its prompts are given as they are, not wrapped
    assert runs["lora"].summary.data["format"] == "prompt-completion"
    assert generation.GenerationSettings().for_run(runs["lora"]).chat_template is False
    assert generation.GenerationSettings(chat_template=True).for_run(runs["lora"]).chat_template is True


def test_asking_again_is_served_from_the_store_without_loading_a_model(table, runs, store, no_loading):
    again = side_by_side({name: _fresh(run) for name, run in runs.items()}, PROMPTS, max_new_tokens=8)
    assert again.served_from_store and not table.served_from_store
    assert again.rows == table.rows
    saved = store.root / "generations" / f"{table.key}.json"
    assert SideBySide.from_dict(json.loads(saved.read_text())).rows == table.rows
    with pytest.raises(AssertionError, match="a model was loaded"):  # other settings: another table
        side_by_side({name: _fresh(run) for name, run in runs.items()}, PROMPTS, max_new_tokens=9)


def test_a_damaged_table_in_the_store_is_answered_again(table, runs, store):
    saved = store.root / "generations" / f"{table.key}.json"
    saved.write_text("{not json")
    again = side_by_side({name: _fresh(run) for name, run in runs.items()}, PROMPTS, max_new_tokens=8)
    assert not again.served_from_store and again.rows == table.rows
    assert SideBySide.from_dict(json.loads(saved.read_text())).rows == table.rows


def test_the_html_table_escapes_prompts_and_answers_and_survives_a_round_trip():
    table = SideBySide(["<script>alert(1)</script>"], {"base": ["a & b"], "lora": ["<b>x</b>"]}, "causal-lm",
                       generation.GenerationSettings().to_dict())
    page = table.to_html()
    assert "<script>" not in page and "&lt;script&gt;" in page and "a &amp; b" in page and "&lt;b&gt;x" in page
    assert "greedy, up to 32 new tokens" in page
    assert SideBySide.from_dict(json.loads(json.dumps(table.to_dict()))) == table


# ----- classification -------------------------------------------------------------------------------------
REGIONS = load_rows("regions", "eval")[:24]


@pytest.fixture(scope="module")
def classifier(store) -> nbtune.Run:
    config = nbtune.TuneConfig(model={"task": "seq-cls"}, data={"source": "nbtune:regions"},
                               training={"max_steps": 20, "micro_batch_size": 16, "eval_every": None, "log_every": 5})
    run = nbtune.train(config, store=store, progress=False)
    assert run.status == "finished", run.error
    return run


def test_a_classifier_predicts_label_names_and_refuses_to_generate(classifier):
    texts = [row["text"] for row in REGIONS]
    predicted = classifier.predict(texts)
    assert len(predicted) == len(texts) and set(predicted) <= {"north", "south", "east", "west"}
    with pytest.raises(ValueError, match=r"use run.predict\(texts\)"):
        classifier.generate(texts)


def test_confusion_counts_sum_to_the_rows_and_the_table_scores_each_run(classifier):
    texts, labels = [row["text"] for row in REGIONS], [row["label"] for row in REGIONS]
    counts = generation.confusion(classifier, texts, labels)
    assert sum(n for row in counts.values() for n in row.values()) == len(texts)
    assert set(counts) == {"north", "south", "east", "west"}
    table = side_by_side({"lora": classifier}, texts, expected=labels)
    assert table.columns == ["lora"]  # an untuned classification head would only guess: no base column
    nonzero = {t: {p: n for p, n in row.items() if n} for t, row in counts.items()}
    assert {t: {p: n for p, n in row.items() if n} for t, row in table.confusion["lora"].items()} == {
        t: row for t, row in nonzero.items() if row}
    diagonal = sum(counts[label][label] for label in counts)
    assert table.accuracy["lora"] == pytest.approx(diagonal / len(texts))
    assert "accuracy" in table.to_html() and "nbtune-confusion" in table.to_html()


def _greedy_by_full_forwards(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding the slow, obviously right way: the whole sequence through the model for every token."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        token = logits[0, -1].argmax().view(1, 1)
        if token.item() == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, token], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning-v2"])
def test_prompt_learning_answers_match_decoding_without_a_cache(store, method):
    """peft 0.21 under transformers 5.24 re-injected the virtual tokens at every cached generation step, so
    prompt-learning runs answered garbage; nbtune's adaptation (methods/peft_methods.py) must keep them right."""
    config = nbtune.TuneConfig(method=method, training={"max_steps": 5, "eval_every": None, "log_every": 5})
    run = nbtune.train(config, store=store, progress=False)
    tokenizer = models.load_tokenizer(run.config)
    answers = run.generate(PROMPTS[:4], max_new_tokens=8)
    expected = [_greedy_by_full_forwards(run.model, tokenizer, p, 8) for p in PROMPTS[:4]]
    assert answers == expected
