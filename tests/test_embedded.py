"""The embedded default: a tiny pre-trained base and built-in datasets that work offline out of the box."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from nbtune.embedded import BASE_MODEL_DIR, DATASETS, EMBEDDED_MODEL, dataset_path, load_rows
from nbtune.embedded import world as world_gen
from nbtune.embedded.build import CORPUS_BYTES, SEED

KNOWLEDGE_TASKS = ("capitals", "regions")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE_MODEL_DIR)


def test_import_is_light():
    code = "import sys, nbtune.embedded; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_base_loads_offline_as_causal_lm_and_classifier(tokenizer, offline):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert EMBEDDED_MODEL == "nbtune:tiny"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    lm = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    assert lm.config.pad_token_id == tokenizer.pad_token_id
    assert lm.config.attention_bias and lm.config.mlp_bias  # BitFit needs biases
    assert sum(p.numel() for p in lm.parameters()) < 2_000_000

    labels = DATASETS["regions"].labels
    clf = AutoModelForSequenceClassification.from_pretrained(BASE_MODEL_DIR, num_labels=len(labels))
    batch = tokenizer(["Zorbia is a country in the", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, len(labels))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_has_train_and_eval_rows_with_its_columns(name):
    spec = DATASETS[name]
    assert spec.task in ("causal-lm", "seq-cls")
    for split in spec.splits:
        rows = load_rows(name, split)
        assert len(rows) >= 100
        for row in rows:
            assert isinstance(row[spec.text_column], str)
            assert spec.prompt_template.format(**row) == row[spec.text_column]
            if spec.task == "causal-lm":
                assert row[spec.target_column].startswith(" ") and spec.label_column is None
            else:
                assert row[spec.label_column] in spec.labels and spec.target_column is None
    if spec.task == "seq-cls":
        assert {r[spec.label_column] for r in load_rows(name, "train")} == set(spec.labels)


def test_unknown_dataset_or_split_is_a_clear_error():
    with pytest.raises(ValueError, match="capitals"):
        dataset_path("nope", "train")
    with pytest.raises(ValueError, match="train, eval"):
        dataset_path("capitals", "test")


@pytest.mark.parametrize("name", KNOWLEDGE_TASKS)
def test_eval_countries_are_held_out_from_train_but_described_in_the_corpus(name):
    train = {r["country"] for r in load_rows(name, "train")}
    held_out = {r["country"] for r in load_rows(name, "eval")}
    assert held_out and not train & held_out

    world = world_gen.make_world(SEED)
    corpus = "\n".join(world_gen.corpus_documents(world, SEED, CORPUS_BYTES))
    for c in world.eval_countries:
        assert f"The capital of {c.name} is {c.capital}." in corpus
        assert re.search(rf"{c.name}[^.]* in the {c.region}\b", corpus)


def test_language_task_holds_out_its_eval_countries_balances_labels_and_uses_corpus_facts():
    # 8 balanced classes: the majority-class baseline is 0.125, far below the best method in
    # bench/results/method-spread-2026-12-01.md (ia3, 0.936 ± 0.011 over 3 seeds)
    spec = DATASETS["languages"]
    world = world_gen.make_world(SEED)
    language = {c.name: c.language for c in world.countries}
    rows = {split: load_rows("languages", split) for split in spec.splits}
    assert not {r["country"] for r in rows["train"]} & {r["country"] for r in rows["eval"]}
    for split_rows in rows.values():
        assert all(r["label"] == language[r["country"]] for r in split_rows)
        counts = [sum(r["label"] == label for r in split_rows) for label in spec.labels]
        assert len(spec.labels) == 8 and max(counts) / len(split_rows) <= 0.15, counts
    corpus = "\n".join(world_gen.corpus_documents(world, SEED, CORPUS_BYTES))
    for r in rows["eval"]:
        assert f"People in {r['country']} speak {r['label']}." in corpus or (
            f"The main language of {r['country']} is {r['label']}." in corpus)


def test_capital_rows_are_short(tokenizer):
    lengths = [
        len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in load_rows("capitals", "train")
    ]
    assert max(lengths) <= 48


def test_generator_is_deterministic_and_matches_shipped_data():
    assert world_gen.make_world(SEED) == world_gen.make_world(SEED)
    assert world_gen.make_world(SEED + 1) != world_gen.make_world(SEED)
    world = world_gen.make_world(SEED)
    first = list(world_gen.corpus_documents(world, SEED, 50_000))
    assert first == list(world_gen.corpus_documents(world, SEED, 50_000))
    rows = world_gen.dataset_rows(world, SEED)
    for name, spec in DATASETS.items():
        for split in spec.splits:
            assert load_rows(name, split) == rows[name][split]


def test_base_is_pretrained_not_random(tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nbtune.embedded.build import corpus_loss, pack

    world = world_gen.make_world(SEED)
    text = list(world_gen.corpus_documents(world, seed=12345, target_bytes=30_000))  # unseen documents
    chunks = pack(tokenizer, text)[:32]
    torch.manual_seed(0)
    pretrained = corpus_loss(AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR), chunks)
    random_init = corpus_loss(
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASE_MODEL_DIR)), chunks
    )
    assert pretrained < 0.3 * random_init, (pretrained, random_init)
