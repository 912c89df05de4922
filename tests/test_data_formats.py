"""Data formats for chat and instruction tuning: detected from the rows, rendered (chat templates, Alpaca),
trained on the right tokens, previewed with the trained part highlighted; in-memory sources stay out of
config.yaml; datasets objects and save_to_disk folders load."""

from __future__ import annotations

import json
import re

import pytest
from nbtune.widgets.data_preview import TRAINED_STYLE, preview_html

import nbtune
from nbtune import data, models
from nbtune.config import ConfigError, TuneConfig
from nbtune.store import cache_key

CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"What is {i} plus 1?"},
                      {"role": "assistant", "content": f"{i + 1}"},
                      {"role": "user", "content": "And doubled?"},
                      {"role": "assistant", "content": f"{2 * (i + 1)}"}]} for i in range(10)]
CHATML_0 = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 0 plus 1?<|im_end|>\n"
            "<|im_start|>assistant\n1<|im_end|>\n<|im_start|>user\nAnd doubled?<|im_end|>\n"
            "<|im_start|>assistant\n2<|im_end|>\n")
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hello.", "input": "", "output": "hello"}] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(TuneConfig())


def chat_config(**data_fields) -> TuneConfig:
    return TuneConfig(data={"source": CHAT, "eval_split": 0.2, "chat_template": "chatml", "max_length": 512,
                            **data_fields})


def trained_runs(example: dict) -> list[list[int]]:
    """The token ids of each contiguous run of trained labels."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize(("rows", "expected"), [
    (CHAT, "chat"),
    (ALPACA, "instruction"),
    ([{"prompt": "2+2=", "completion": "4"}] * 4, "prompt-completion"),
    ([{"text": "Once upon a time"}] * 4, "text"),
    ([{"prompt": "Say hi", "chosen": "hi", "rejected": "go away"}] * 4, "preference"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
       "rejected": [{"role": "assistant", "content": "no"}]}] * 4, "preference"),
    ([{"prompt": "2+2=", "reference": "4"}] * 4, "prompt-reference"),
])
def test_each_format_is_detected_from_its_rows(rows, expected):
    config = TuneConfig(data={"source": rows, "eval_split": 0.25})
    assert data.preview(config)["format"] == expected


def test_a_configured_target_means_prompt_completion_and_unknown_columns_ask_for_data_format():
    rows = [{"q": "2+2=", "a": "4"}] * 4
    assert data.preview(TuneConfig(data={"source": rows, "prompt_template": "{q}", "target_column": "a",
                                         "eval_split": 0.25}))["format"] == "prompt-completion"
    with pytest.raises(ConfigError) as err:
        data.preview(TuneConfig(data={"source": rows, "eval_split": 0.25}))
    assert err.value.for_field("data.format") and "'a', 'q'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        data.preview(TuneConfig(data={"source": rows, "format": "chat", "eval_split": 0.25}))
    assert "messages" in err.value.for_field("data.format")


def test_alpaca_rows_have_the_input_section_only_when_their_input_is_not_empty(tokenizer):
    config = TuneConfig(data={"source": ALPACA, "eval_split": 0.25, "max_length": 256})
    shown = data.preview(config, tokenizer, rows=2)["rows"]
    with_input, without = ("".join(text for text, _ in r["pieces"]) for r in shown)
    assert "### Input:\n2 and 3\n\n### Response:\n5" in with_input
    assert "### Input" not in without and "### Instruction:\nSay hello.\n\n### Response:\nhello" in without
    example = data.prepare(config, tokenizer).train[0]
    assert tokenizer.decode(sum(trained_runs(example), [])) in ("5</s>", "hello</s>")


def test_chatml_renders_exactly_and_trains_only_the_assistant_turns_and_their_end_token(tokenizer):
    config = chat_config(eval_split=0.1, max_samples=None)
    rows, _ = data.load_rows(config)
    prepared = data.prepare(config, tokenizer)
    first = next(i for i, r in enumerate(rows) if r == CHAT[0])
    example = prepared.train[first]
    assert tokenizer.decode(example["input_ids"]) == CHATML_0
    assert [tokenizer.decode(run) for run in trained_runs(example)] == ["1<|im_end|>", "2<|im_end|>"]
    assert prepared.stats["format"] == "chat"


def test_train_on_all_trains_every_token_and_plain_text_is_always_trained_whole(tokenizer):
    example = data.prepare(chat_config(train_on="all"), tokenizer).train[0]
    assert example["labels"] == example["input_ids"]
    text = TuneConfig(data={"source": [{"text": f"Once upon a time {i}"} for i in range(4)], "eval_split": 0.25})
    example = data.prepare(text, tokenizer).train[0]
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == tokenizer.eos_token_id


def test_the_tokenizers_own_chat_template_is_used_and_its_assistant_turns_located(tokenizer):
    own = tokenizer.__class__.from_pretrained(models.resolve_path("nbtune:tiny"))
    own.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}{% if m['role'] == "
                         "'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    example = data.prepare(chat_config(chat_template="auto"), own).train[0]
    text = own.decode(example["input_ids"])
    assert text.startswith("[system] Be brief.\n[user] What is") and "<|im_start|>" not in text
    assert [own.decode(run) for run in trained_runs(example)] == [r.split("\n")[0] for r in text.split(
        "[assistant] ")[1:]]


def test_assistant_turns_located_from_the_template_agree_with_its_generation_markers(tokenizer):
    own = tokenizer.__class__.from_pretrained(models.resolve_path("nbtune:tiny"))
    own.chat_template = ("{% for m in messages %}{{ '<s>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                         "{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{% else %}"
                         "{{ m['content'] + '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")
    example = data.prepare(chat_config(chat_template="auto"), own).train[0]
    rows, _ = data.load_rows(chat_config())
    marked = own.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert example["input_ids"] == marked["input_ids"]
    assert [label != -100 for label in example["labels"]] == [bool(m) for m in marked["assistant_masks"]]


def test_a_messages_jsonl_is_never_trained_on_its_python_repr(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    for template in ("auto", "chatml"):  # the tokenizer's own template where it has one, else chatml
        config = TuneConfig(data={"source": str(path), "eval_split": 0.2, "max_length": 512,
                                  "chat_template": template})
        example = data.prepare(config, tokenizer).train[0]
        text = tokenizer.decode(example["input_ids"])
        assert "role" not in text and "content" not in text and "And doubled?" in text
        assert len(trained_runs(example)) == 2
    with pytest.raises(ConfigError) as err:  # named as a text column, it is refused rather than its repr used
        data.prepare(TuneConfig(data={"source": str(path), "format": "text", "text_column": "messages",
                                      "eval_split": 0.2}), tokenizer)
    assert "data.format chat" in err.value.for_field("data.format")


def test_datasets_objects_and_save_to_disk_folders_are_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i}"} for i in range(10)]
    dataset = datasets.Dataset.from_list(rows)
    splits = datasets.DatasetDict({"train": dataset, "eval": datasets.Dataset.from_list(rows[:3])})
    dataset.save_to_disk(str(tmp_path / "one"))
    splits.save_to_disk(str(tmp_path / "two"))
    for source, eval_split, expected in ((dataset, 0.2, 8), (splits, "eval", 10), (str(tmp_path / "one"), 0.2, 8),
                                         (str(tmp_path / "two"), "eval", 10)):
        train, held_out = data.load_rows(TuneConfig(data={"source": source, "eval_split": eval_split}))
        assert len(train) == expected and all(r in rows for r in train + held_out)
    with pytest.raises(ConfigError) as err:
        data.load_rows(TuneConfig(data={"source": splits, "split": "test"}))
    assert "train" in err.value.for_field("data.split")


def test_in_memory_rows_are_named_by_fingerprint_in_the_yaml_and_keep_their_cache_key():
    rows = [{"q": f"what is {i} plus 1?", "a": f" {i + 1}"} for i in range(120)]
    config = TuneConfig(data={"source": rows, "prompt_template": "{q}", "target_column": "a"})
    text = config.to_yaml()
    assert len(text) < 1500 and "what is" not in text
    assert f"<in-memory: 120 rows, fingerprint {data.fingerprint(rows)}>" in text
    same = TuneConfig(data={"source": [dict(r) for r in rows], "prompt_template": "{q}", "target_column": "a"})
    assert cache_key(same) == cache_key(config)
    other = config.replace(**{"data.source": rows[:-1]})
    assert cache_key(other).key != cache_key(config).key
    read_back = TuneConfig.from_yaml(text)
    assert read_back.content_hash == config.content_hash  # what the store recomputes to serve a cached run
    with pytest.raises(ConfigError) as err:
        data.load_rows(read_back)
    assert "in-memory rows" in err.value.for_field("data.source")


def test_preference_rows_fail_on_the_supervised_stage_before_training_naming_data_format(tokenizer):
    from nbtune import stages

    rows = [{"prompt": "Say hi", "chosen": "hi", "rejected": "go away"}] * 4
    config = TuneConfig(data={"source": rows, "eval_split": 0.25})
    with pytest.raises(ConfigError) as err:
        stages.for_config(config).prepare_data(config, tokenizer)
    assert "set training.stage to dpo" in err.value.for_field("data.format")
    shown = data.preview(config, tokenizer)
    assert shown["format"] == "preference" and shown["trainable"] is False
    assert "[chosen] hi" in shown["rows"][0]["input"]
    assert data.preview(config.replace(**{"training.stage": "dpo"}), tokenizer)["trainable"] is True


def test_the_preview_names_the_format_and_highlights_the_trained_part(tokenizer):
    page = preview_html(data.preview(chat_config(), tokenizer))
    assert "Format <b>chat</b>" in page
    assert re.search(f"<span style='{TRAINED_STYLE}'>[0-9]+&lt;\\|im_end\\|&gt;</span>", page)
    assert f"<span style='{TRAINED_STYLE}'>" + "&lt;|im_start|&gt;user" not in page
    page = preview_html(data.preview(TuneConfig(data={"source": ALPACA, "eval_split": 0.25}), tokenizer))
    assert "Format <b>instruction</b>" in page and f"<span style='{TRAINED_STYLE}'>5</span>" in page


@pytest.mark.slow
def test_a_chat_dataset_trains_with_lora(store):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(10)]
    config = TuneConfig(data={"source": rows, "eval_split": 0.2, "chat_template": "chatml"}, method="lora",
                        training={"max_steps": 5, "micro_batch_size": 4, "eval_every": None, "log_every": 1})
    run = nbtune.launch(config, store=store)
    run.wait()
    assert run.summary.state == "finished", run.summary
    assert run.summary.data["format"] == "chat"


def test_the_builder_keeps_its_in_memory_rows_when_its_own_yaml_is_loaded_back():
    pytest.importorskip("ipywidgets")
    from nbtune.widgets.builder import Builder

    b = Builder(chat_config(), debounce_s=3600.0)
    assert "fingerprint" in b.controls["data.source"].input.value
    b.load_yaml(b.yaml.value)  # the YAML names the rows; the form still holds them
    assert b.config.data.source == CHAT
