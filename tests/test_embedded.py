"""The embedded default: a tiny pre-trained base and built-in datasets that work offline out of the box."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbtune.embedded import BASE_MODEL_DIR, DATA_DIR, DATASETS, EMBEDDED_MODEL, dataset_path, load_rows
from nbtune.embedded import world as world_gen
from nbtune.embedded.build import CHAT_TEMPLATE, CORPUS_BYTES, SEED, SEQ_LEN
from nbtune.tasks import TASKS

KNOWLEDGE_TASKS = ("capitals", "regions")
COLUMN_DATASETS = sorted(n for n, d in DATASETS.items() if d.format == "columns")
CHAT_DATASETS = ("chat", "prefs")


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


@pytest.mark.parametrize("name", COLUMN_DATASETS)
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
        for split in spec.splits if TASKS[spec.task].inputs == "text" else ():  # images: shapes.py
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


# ----- chat and preference data, and the chat template ----------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> str:
    return "\n".join(world_gen.corpus_documents(world_gen.make_world(SEED), SEED, CORPUS_BYTES))


def _conversation(row: dict) -> list[dict]:
    """A row's whole conversation: the chat messages, or a preference prompt followed by its chosen answer."""
    return row["messages"] if "messages" in row else row["prompt"] + row["chosen"]


def _facts(c: world_gen.Country) -> set[str]:
    return {world_gen.CAPITAL_ANSWER.format(**vars(c)), world_gen.LANGUAGE_ANSWER.format(**vars(c))}


def test_chat_rows_are_conversations_ending_in_the_assistants_answer():
    assert DATASETS["chat"].format == "chat" and DATASETS["chat"].task == "causal-lm"
    for split, size in (("train", 200), ("eval", 100)):
        rows = load_rows("chat", split)
        assert len(rows) == size
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert all(set(m) == {"role", "content"} for m in row["messages"])
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns == ["user", "assistant"] * (len(turns) // 2) and turns
            assert row["answer"] == row["messages"][-1]["content"]
    train = load_rows("chat", "train")
    with_system = sum(r["messages"][0]["role"] == "system" for r in train)
    two_turn = sum(len([m for m in r["messages"] if m["role"] == "user"]) == 2 for r in train)
    asks_capital = sum(r["answer"].startswith("The capital of ") for r in train)
    assert all(0.2 * len(train) < n < 0.8 * len(train) for n in (with_system, two_turn, asks_capital))


def _names(c: world_gen.Country) -> set[str]:
    """The facts about `c` as just the name, the short reply form of the preference pairs."""
    return {f"{c.capital}.", f"{c.language}."}


def test_preference_rows_ask_for_a_reply_form_and_prefer_it_both_answers_stating_the_right_fact():
    assert DATASETS["prefs"].format == "preference" and DATASETS["prefs"].task == "causal-lm"
    country = {c.name: c for c in world_gen.make_world(SEED).countries}
    requests = {"Reply with just the name.": "name", "Reply in a full sentence.": "sentence"}
    for split, size in (("train", 200), ("eval", 100)):
        rows = load_rows("prefs", split)
        assert len(rows) == size
        asked = {"name": 0, "sentence": 0}
        for row in rows:
            c, last = country[row["country"]], row["prompt"][-1]
            assert last["role"] == "user" and [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
            form = next(f for request, f in requests.items() if last["content"].endswith(" " + request))
            asked[form] += 1
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            name, sentence = (chosen, rejected) if form == "name" else (rejected, chosen)
            assert name in _names(c) and sentence in _facts(c), row
            assert sentence.endswith(" " + name)  # the same fact in both forms
        assert asked == {"name": size // 2, "sentence": size // 2}
        with_system = sum(r["prompt"][0]["role"] == "system" for r in rows)
        two_turn = sum(len([m for m in r["prompt"] if m["role"] == "user"]) == 2 for r in rows)
        assert all(0.15 * size < n < 0.85 * size for n in (with_system, two_turn)), (with_system, two_turn)


@pytest.mark.parametrize("name", CHAT_DATASETS)
def test_chat_eval_countries_are_held_out_and_every_answer_is_the_worlds_fact(name, corpus):
    world = world_gen.make_world(SEED)
    country = {c.name: c for c in world.countries}
    train, held_out = (load_rows(name, split) for split in ("train", "eval"))
    assert {r["country"] for r in held_out} <= {c.name for c in world.eval_countries}
    assert {r["country"] for r in train} <= {c.name for c in world.train_countries}
    for row in train + held_out:
        c = country[row["country"]]
        answers = [m["content"] for m in _conversation(row) if m["role"] == "assistant"]
        stated = _facts(c) | (_names(c) if name == "prefs" else set())  # prefs also answer with just the name
        assert answers and all(a in stated for a in answers), row
    for row in held_out:  # the base read every held-out fact in pre-training
        c = country[row["country"]]
        assert world_gen.CAPITAL_ANSWER.format(**vars(c)) in corpus
        assert world_gen.LANGUAGE_ANSWER.format(**vars(c)) in corpus or (
            f"The main language of {c.name} is {c.language}." in corpus)


def test_the_embedded_tokenizer_renders_chats_with_its_own_tokens(tokenizer):
    from transformers import AutoConfig

    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == AutoConfig.from_pretrained(BASE_MODEL_DIR).vocab_size  # no token was added
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Lonora?"},
        {"role": "assistant", "content": "The capital of Lonora is Futhheim."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<s>system\nBe brief.</s>\n<s>user\nWhat is the capital of Lonora?</s>\n"
        "<s>assistant\nThe capital of Lonora is Futhheim.</s>\n"
    )
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.bos_token_id) == 3 and ids.count(tokenizer.eos_token_id) == 3
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_the_generation_prompt_ends_with_the_assistant_header(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of Lonora?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user\nWhat is the capital of Lonora?</s>\n<s>assistant\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s>user\nWhat is the capital of Lonora?</s>\n"


def test_the_assistant_mask_covers_exactly_the_assistant_answers_and_their_end(tokenizer):
    row = next(r for r in load_rows("chat", "train") if len(r["messages"]) >= 4)
    out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tokenizer.decode(ids[start:i]))
            start = None
    assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert spans == [a + tokenizer.eos_token for a in assistant]  # so the model learns to stop


@pytest.mark.parametrize("name", CHAT_DATASETS)
def test_every_chat_row_fits_the_base_context(name, tokenizer):
    lengths = [
        len(tokenizer.apply_chat_template(_conversation(r) if name == "chat" else r["prompt"] + r[side],
                                          tokenize=True, return_dict=True)["input_ids"])
        for split in ("train", "eval") for r in load_rows(name, split) for side in ("chosen", "rejected")
    ]
    assert max(lengths) <= SEQ_LEN - 16, max(lengths)


# ----- the embedded vision default: nbtune:tiny-vit and nbtune:shapes (nbtune/embedded/build_vision.py) -------

def test_the_shapes_set_holds_out_colour_and_place_combinations_from_train():
    from nbtune.embedded import shapes

    spec = DATASETS["shapes"]
    assert spec.task == "image-cls" and spec.format == "image-folder"
    train, evaluation = load_rows("shapes", "train"), load_rows("shapes", "eval")
    assert len(train) == 640 and len(evaluation) == 160
    assert sorted({r["label"] for r in train}) == list(shapes.SHAPES) == sorted({r["label"] for r in evaluation})
    trained = set(shapes.combos("train"))
    assert not trained & set(shapes.combos("eval"))  # no eval combination is ever seen in training
    assert all(Path(r["image"]).is_file() for r in train + evaluation)


def test_the_shapes_images_are_the_generators(tmp_path):
    from nbtune.embedded import build_vision

    build_vision.write_dataset(tmp_path)
    shipped = sorted(p.relative_to(DATA_DIR / "shapes") for p in (DATA_DIR / "shapes").rglob("*.png"))
    made = sorted(p.relative_to(tmp_path / "data" / "shapes") for p in (tmp_path / "data" / "shapes").rglob("*.png"))
    assert shipped == made
    for path in shipped[::37]:
        assert (DATA_DIR / "shapes" / path).read_bytes() == (tmp_path / "data" / "shapes" / path).read_bytes()


def test_the_embedded_vit_is_pretrained_on_the_shapes_world(offline):
    """Its pre-training head (shape, colour, place) names the shapes of the downstream eval images, which a
    random ViT of the same config does not."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from nbtune.embedded import VISION_MODEL_DIR, shapes

    processor = AutoImageProcessor.from_pretrained(VISION_MODEL_DIR)
    rows = load_rows("shapes", "eval")
    pixels = torch.cat([processor(images=Image.open(r["image"]).convert("RGB"), return_tensors="pt")["pixel_values"]
                        for r in rows])
    truth = torch.tensor([shapes.SHAPES.index(r["label"]) for r in rows])

    def shape_accuracy(model) -> float:
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        columns = [names.index(f"shape:{s}") for s in shapes.SHAPES]
        with torch.no_grad():
            logits = model.eval()(pixel_values=pixels).logits[:, columns]
        return float((logits.argmax(1) == truth).float().mean())

    pretrained = AutoModelForImageClassification.from_pretrained(VISION_MODEL_DIR)
    torch.manual_seed(0)
    random_vit = AutoModelForImageClassification.from_config(pretrained.config)
    assert shape_accuracy(pretrained) >= 0.8 > 0.4 >= shape_accuracy(random_vit)


# ----- the embedded captioner: nbtune:tiny-captioner and nbtune:shape-captions (build_captioner.py) -----------

CAPTIONER_DIR = Path(__file__).parents[1] / "nbtune" / "embedded" / "captioner"


def _caption_rows(split: str) -> list[dict]:
    from nbtune.embedded import build_captioner

    return build_captioner.load_caption_rows(DATA_DIR / "shape-captions", split)


def test_the_caption_rows_reuse_the_shipped_shapes_and_caption_the_generators_attributes():
    import numpy as np
    from PIL import Image

    from nbtune.embedded import build_captioner, shapes

    combos = {}
    for split, size in (("train", 640), ("eval", 160)):
        raw = [json.loads(line) for line in (DATA_DIR / "shape-captions" / f"{split}.jsonl").open(encoding="utf-8")]
        assert len(raw) == size and all(set(r) == {"image", "caption"} for r in raw)
        assert all(r["image"].startswith(f"../shapes/{split}/") for r in raw)
        rows = _caption_rows(split)
        shipped = sorted(str(p.resolve()) for p in (DATA_DIR / "shapes" / split).rglob("*.png"))
        assert sorted(r["image"] for r in rows) == shipped  # every shipped PNG once, nothing else
        made = {str((DATA_DIR / "shapes" / rel).resolve()): s for rel, s in build_captioner.shipped_samples(split)}
        for i, row in enumerate(rows):
            s = made[row["image"]]
            assert row["caption"] == build_captioner.DOWNSTREAM_TEMPLATE.format(
                shape=s.shape, colour=s.colour, position=s.position.replace("-", " "))
            assert build_captioner.parse(row["caption"], (build_captioner.DOWNSTREAM_TEMPLATE,)) == (
                s.shape, s.colour, s.position)
            if i % 23 == 0:  # the regenerated image is the shipped one
                with Image.open(row["image"]) as png:
                    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(s.image))
        combos[split] = {(s.shape, s.colour, s.position) for s in made.values()}
    assert combos["train"] == set(shapes.combos("train")) and combos["eval"] == set(shapes.combos("eval"))
    assert not combos["train"] & combos["eval"]  # eval captions describe combinations train never shows


def test_the_caption_forms_of_pretraining_and_the_dataset_differ():
    from nbtune.embedded import build_captioner

    assert build_captioner.DOWNSTREAM_TEMPLATE not in build_captioner.PRETRAIN_TEMPLATES
    first_words = [t.split()[0] for t in build_captioner.PRETRAIN_TEMPLATES]
    assert len(set(first_words)) == len(first_words)
    assert build_captioner.caption(build_captioner.DOWNSTREAM_TEMPLATE, "circle", "red", "top-left") == (
        "a red circle in the top left")


def test_the_captioner_tokenizer_round_trips_every_caption(offline):
    from transformers import AutoTokenizer

    from nbtune.embedded import build_captioner, shapes

    tokenizer = AutoTokenizer.from_pretrained(CAPTIONER_DIR)
    assert tokenizer.pad_token and tokenizer.bos_token and tokenizer.eos_token and tokenizer.unk_token
    captions = [build_captioner.caption(t, *c) for t in (*build_captioner.PRETRAIN_TEMPLATES,
                                                         build_captioner.DOWNSTREAM_TEMPLATE)
                for c in shapes.combos("all")]
    ids = tokenizer(captions)["input_ids"]
    for text, seq in zip(captions, ids, strict=True):
        assert seq[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in seq
        assert tokenizer.unk_token_id not in seq and len(seq) == len(text.split()) + 1
        assert tokenizer.decode(seq, skip_special_tokens=True) == text
    forms = captions[::100][:3]  # one caption of each pre-training form, of different lengths
    labels = build_captioner.labels(tokenizer, forms)  # the training labels: ids + EOS, no BOS, pad -100
    for row, seq in zip(labels.tolist(), tokenizer(forms)["input_ids"], strict=True):
        assert row == seq + [-100] * (labels.shape[1] - len(seq))


def test_the_embedded_captioner_captions_eval_images_in_its_pretraining_forms_only(offline):
    """Greedy captions (no generate arguments) of held-out downstream images name the right shape, colour and
    place in a pre-training form; none is in the dataset's form, which only a fine-tune learns."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from nbtune.embedded import build_captioner

    tokenizer = AutoTokenizer.from_pretrained(CAPTIONER_DIR)
    processor = AutoImageProcessor.from_pretrained(CAPTIONER_DIR)
    model = AutoModelForImageTextToText.from_pretrained(CAPTIONER_DIR).eval()
    assert type(model).__name__ == "VisionEncoderDecoderModel"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    rows = _caption_rows("eval")[:40]
    pixels = build_captioner.image_pixels(processor, [r["image"] for r in rows])
    with torch.no_grad():
        made = tokenizer.batch_decode(model.generate(pixel_values=pixels), skip_special_tokens=True)
    truth = [build_captioner.parse(r["caption"], (build_captioner.DOWNSTREAM_TEMPLATE,)) for r in rows]
    correct = sum(build_captioner.parse(m) == t for m, t in zip(made, truth, strict=True)) / len(rows)
    downstream = sum(m == r["caption"] for m, r in zip(made, rows, strict=True)) / len(rows)
    assert correct >= 0.8 and downstream <= 0.05, (correct, downstream, made[:5])


def test_every_shipped_embedded_file_is_package_data():
    """A wheel carries only the files pyproject's package-data globs name (`*` does not cross folders): each file
    of nbtune/embedded that is not Python must match one, or a pip-installed nbtune lacks it."""
    import fnmatch
    import tomllib

    root = Path(__file__).parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "nbtune.embedded"]
    embedded = root / "nbtune" / "embedded"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", str(embedded)],
                             cwd=root, capture_output=True, text=True, check=True).stdout.split()
    shipped = [Path(f).relative_to("nbtune/embedded").as_posix() for f in tracked if not f.endswith(".py")]
    unmatched = [f for f in shipped if not any(
        fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert shipped and not unmatched, unmatched
