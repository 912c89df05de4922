"""training.packing: examples packed end to end train exactly as padded ones do, with fewer tokens computed."""

from __future__ import annotations

import pytest

import nbtune
from nbtune import TuneConfig
from nbtune.config import ConfigError
from nbtune.methods import registry

CHAT = {"source": "nbtune:chat", "max_samples": 24}
ALL = {**CHAT, "train_on": "all"}  # every label a token: the first of each example too


def prepared(method: str = "lora", attention: str = "sdpa", rows: dict | None = None, **training):
    from nbtune import data, models

    config = TuneConfig(model={"attn_implementation": attention}, method=method, data=rows or CHAT,
                        training={"packing": True, **training})
    tokenizer = models.load_tokenizer(config)
    return config, tokenizer, data.prepare(config, tokenizer)


def token_losses(logits, labels):
    """Each position's cross-entropy for predicting the next label (0 where the next label is ignored)."""
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), shifted, reduction="none",
                                               ignore_index=-100)
    return losses, shifted != -100


def packed_example_losses(model, batch):
    """Mean next-token loss of each example in a packed batch, by the example's token ids."""
    losses, kept = token_losses(model(**batch).logits, batch["labels"])
    out = {}
    for row, positions in enumerate(batch["position_ids"]):
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            if kept[row, start:end].any():  # a filler token has no label to predict
                ids = tuple(batch["input_ids"][row, start:end].tolist())
                out[ids] = float(losses[row, start:end].sum() / kept[row, start:end].sum())
    return out


def padded_example_losses(model, batch, examples):
    losses, kept = token_losses(model(**batch).logits, batch["labels"])
    return {tuple(x["input_ids"]): float(losses[i].sum() / kept[i].sum()) for i, x in enumerate(examples)}


def test_packed_rows_are_as_long_as_the_longest_example_and_keep_every_example_whole():
    config, tokenizer, data = prepared(rows=ALL)
    examples = data.train[:16]
    batch = data.packing(examples)
    positions, labels = batch["position_ids"], batch["labels"]
    assert batch["input_ids"].shape[1] == max(len(x["input_ids"]) for x in examples)
    assert batch["input_ids"].shape[0] < len(examples)  # fewer rows than examples: the padding is gone
    assert int((positions == 0).sum()) >= len(examples)  # each example restarts its positions
    starts = positions == 0
    assert (labels[starts] == -100).all()  # no example is trained to predict across the boundary before it
    assert data.packing.real_tokens(batch) == sum(len(x["input_ids"]) for x in examples)
    assert batch["use_cache"] is False  # a model building a cache would ignore the position restarts


def two_that_fit_beside_a_longer_one(examples):
    """A long example, and two shorter ones that together fit in a row as long as it."""
    by_length = sorted(examples, key=lambda x: len(x["input_ids"]))
    longest = by_length[-1]
    first, second = by_length[0], by_length[1]
    assert len(first["input_ids"]) + len(second["input_ids"]) <= len(longest["input_ids"])
    return longest, second, first  # packed longest first: `second` opens the second row, `first` follows it


def test_flash_attention_packs_the_whole_batch_in_one_row_with_no_filler():
    from nbtune.data import packing_collator

    config = TuneConfig(model={"attn_implementation": "flash_attention_2"}, data=CHAT, training={"packing": True})
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 7, 2)]
    batch = packing_collator(config, pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (1, 12)
    assert batch["position_ids"].tolist() == [[*range(7), *range(3), *range(2)]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_example_packed_after_another_gets_the_logits_it_gets_alone(attention):
    import torch

    from nbtune import models

    config, tokenizer, data = prepared("full", attention)
    model = models.build(config, tokenizer=tokenizer).model.eval()
    longest, opening, later = two_that_fit_beside_a_longer_one(data.train)
    batch = data.packing([longest, opening, later])  # equal lengths keep this order
    assert batch["input_ids"].shape[0] == 2  # `opening` and `later` share the second row
    assert batch["input_ids"][1, :len(opening["input_ids"])].tolist() == opening["input_ids"]
    with torch.no_grad():
        start = len(opening["input_ids"])
        packed = model(**batch).logits[1, start:start + len(later["input_ids"])]
        alone = model(input_ids=torch.tensor([later["input_ids"]])).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_each_example_has_the_same_loss_packed_as_padded(method):
    import torch

    from nbtune import data as data_module
    from nbtune import models

    config, tokenizer, data = prepared(method, rows=ALL)
    model = models.build(config, tokenizer=tokenizer).model.eval()
    examples = data.train[:12]
    padded_batch = data_module.Collator(tokenizer.pad_token_id, "causal-lm")(examples)
    padded_batch["labels"][:, 0] = -100  # a padded example's first label is never predicted either
    with torch.no_grad():
        packed = packed_example_losses(model, data.packing(examples))
        padded = padded_example_losses(model, padded_batch, examples)
        whole_packed = model(**data.packing(examples)).loss
        whole_padded = model(**padded_batch).loss
    assert len(packed) == len(examples) and packed.keys() == padded.keys()
    assert packed == pytest.approx(padded, rel=1e-4)
    assert float(whole_packed) == pytest.approx(float(whole_padded), rel=1e-4)


def test_a_packed_run_counts_the_same_real_tokens_as_a_padded_one(store):
    runs = {}
    for packing in (False, True):
        config = TuneConfig(data=CHAT, training={"max_steps": 2, "micro_batch_size": 8, "eval_every": None,
                                                 "log_every": 1, "packing": packing})
        runs[packing] = nbtune.train(config, store=store, progress=False)
    assert runs[True].summary.state == "finished", runs[True].summary.error
    assert runs[True].summary.tokens_seen == runs[False].summary.tokens_seen > 0
    assert runs[True].config.content_hash != runs[False].config.content_hash


@pytest.mark.parametrize("method", [m.name for m in registry.all_methods(include_generated=False) if m.virtual_tokens])
def test_methods_that_prepend_virtual_tokens_cannot_pack_and_say_why(method):
    with pytest.raises(ConfigError) as err:
        TuneConfig(method=method, training={"packing": True})
    message = err.value.for_field("training.packing")
    assert method in message and "virtual tokens" in message and "method.num_virtual_tokens" in message


def test_packing_needs_causal_lm_and_only_sft_reads_it():
    with pytest.raises(ConfigError) as err:
        TuneConfig(model={"task": "seq-cls"}, data={"source": "nbtune:regions"}, training={"packing": True})
    assert "causal-lm" in err.value.for_field("training.packing")
    dpo = TuneConfig(data={"source": "nbtune:prefs"}, training={"stage": "dpo"})
    assert dpo.replace(**{"training.packing": True}).content_hash == dpo.content_hash
    sft = TuneConfig()
    assert sft.replace(**{"training.packing": True}).content_hash != sft.content_hash
