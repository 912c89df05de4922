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


def spans(batch):
    """(row, start, end) of each example in a packed batch, read from its position-id restarts."""
    out = []
    for row, positions in enumerate(batch["position_ids"]):
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
        out += [(row, start, end) for start, end in zip(starts, starts[1:], strict=False)]
    return out


def span_of(batch, example):
    """Where `example` lies in a packed batch."""
    return next((row, start, end) for row, start, end in spans(batch)
                if batch["input_ids"][row, start:end].tolist() == example["input_ids"])


@pytest.mark.parametrize(("attention", "one_row"), [("sdpa", True), ("eager", False)])
def test_packing_keeps_every_example_whole_in_one_row_where_attention_runs_per_example(attention, one_row):
    """sdpa attends per example (nbtune/packed_attention.py): the whole batch in one row, no filler. eager computes
    each row's full masked square: rows no longer than the longest example."""
    config, tokenizer, data = prepared(attention=attention, rows=ALL)
    examples = data.train[:16]
    batch = data.packing(examples)
    positions, labels = batch["position_ids"], batch["labels"]
    if one_row:
        assert batch["input_ids"].shape == (1, sum(len(x["input_ids"]) for x in examples))
    else:
        assert batch["input_ids"].shape[1] == max(len(x["input_ids"]) for x in examples)
        assert 1 < batch["input_ids"].shape[0] < len(examples)  # fewer rows than examples: the padding is gone
    assert int((positions == 0).sum()) >= len(examples)  # each example restarts its positions
    starts = positions == 0
    assert (labels[starts] == -100).all()  # no example is trained to predict across the boundary before it
    assert data.packing.real_tokens(batch) == sum(len(x["input_ids"]) for x in examples)
    assert batch["use_cache"] is False  # a model building a cache would ignore the position restarts


def test_packed_attention_is_chosen_for_sdpa_only_while_packing():
    from nbtune import models, packed_attention
    from nbtune.config import ATTENTION

    assert set(packed_attention.PACKED) == set(ATTENTION)  # the table says what packing does under each choice
    for attention, packing, loaded in [("sdpa", True, packed_attention.NAME), ("sdpa", False, "sdpa"),
                                       ("eager", True, "eager")]:
        config = TuneConfig(model={"attn_implementation": attention}, data=CHAT, training={"packing": packing})
        model = models.build(config, tokenizer=models.load_tokenizer(config)).model
        assert model.config._attn_implementation == loaded, (attention, packing)
    dpo = TuneConfig(data={"source": "nbtune:prefs"}, training={"stage": "dpo", "packing": True})
    assert packed_attention.attn_implementation(dpo) == "sdpa"  # dpo does not pack: nothing changes


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
    batch = data.packing([longest, opening, later])
    row, start, end = span_of(batch, later)
    assert start > 0  # `later` follows another example in its row
    if attention == "eager":
        assert batch["input_ids"].shape[0] == 2  # `opening` and `later` share the second row
    with torch.no_grad():
        packed = model(**batch).logits[row, start:end]
        alone = model(input_ids=torch.tensor([later["input_ids"]])).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_no_token_attends_across_an_example_boundary():
    """Changing one example's tokens changes its own logits and no other example's."""
    import torch

    from nbtune import models

    config, tokenizer, data = prepared("full")
    model = models.build(config, tokenizer=tokenizer).model.eval()
    examples = data.train[:8]
    batch = data.packing(examples)
    first = spans(batch)[0]
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    row, start, end = first
    changed["input_ids"][row, start + 1:end] = (changed["input_ids"][row, start + 1:end] + 7) % len(tokenizer)
    with torch.no_grad():
        before, after = model(**batch).logits, model(**changed).logits
    assert not torch.allclose(before[row, start + 1:end], after[row, start + 1:end], atol=1e-3)
    others = [s for s in spans(batch) if s != first]
    assert len(others) == len(examples) - 1
    for row, start, end in others:
        torch.testing.assert_close(after[row, start:end], before[row, start:end], atol=1e-5, rtol=1e-5)


def test_sdpa_attends_per_example_with_no_row_by_row_mask(monkeypatch):
    """The cost is each example's own square: no sdpa call sees keys beyond one example, and none gets a mask."""
    import torch

    from nbtune import models

    config, tokenizer, data = prepared("lora")
    model = models.build(config, tokenizer=tokenizer).model.eval()
    examples = data.train[:16]
    batch = data.packing(examples)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((key.shape[-2], attn_mask))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(**batch)
    assert batch["input_ids"].shape[0] == 1 and calls
    assert max(keys for keys, _ in calls) == max(len(x["input_ids"]) for x in examples) < batch["input_ids"].shape[1]
    assert all(mask is None for _, mask in calls)
    lengths = {len(x["input_ids"]) for x in examples}
    assert len(calls) == len(lengths) * model.config.num_hidden_layers  # one call per length, not per example


def test_the_mask_step_separates_examples_exactly_as_transformers_mask_does():
    """Rows of several examples and fillers: the example ids the mask step hands the attention describe the same
    mask transformers' sdpa would have been given, and the per-example attention computes the same output."""
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    from nbtune import packed_attention

    packed_attention.register()
    lengths = [[5, 3, 7, 1, 1], [9, 4, 3, 1], [17]]  # unsorted, fillers of one token, a row of one example
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    hidden = torch.zeros(3, 17, 8)
    masks = {}
    for implementation in ("sdpa", packed_attention.NAME):
        config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
        config._attn_implementation = implementation
        masks[implementation] = create_causal_mask(config, hidden, None, None, position_ids=positions)
    ids = masks[packed_attention.NAME]
    assert ids.shape == (3, 17) and ids.dtype == torch.long  # per token, not (row x row)
    same_example = ids[:, None, :, None] == ids[:, None, None, :]
    assert torch.equal(same_example & torch.ones(17, 17, dtype=torch.bool).tril(), masks["sdpa"])
    q, k, v = torch.randn(3, 4, 17, 8), torch.randn(3, 2, 17, 8), torch.randn(3, 2, 17, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks["sdpa"], enable_gqa=True)
    torch.testing.assert_close(packed_attention.attend_per_example(q, k, v, ids), expected.transpose(1, 2))


def test_a_sliding_window_model_packs_correctly_through_sdpas_own_mask():
    """A mask that is not plain causal (a sliding window) goes to transformers' sdpa, boundaries included."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from nbtune import packed_attention

    packed_attention.register()
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, sliding_window=3)
    model = MistralForCausalLM(config).eval()
    model.set_attn_implementation(packed_attention.NAME)
    first, second = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 5))
    positions = torch.tensor([[*range(6), *range(5)]])
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        alone = model(input_ids=second).logits
    torch.testing.assert_close(packed[0, 6:], alone[0], atol=1e-5, rtol=1e-5)


def test_generation_and_padded_batches_are_unchanged_on_a_model_loaded_for_packing():
    """Generation (a cache) and padded batches (an attention mask) go to transformers' sdpa as they would without
    packing: the same tokens, the same logits."""
    import torch

    from nbtune import models, packed_attention

    loaded = {}
    for packing in (True, False):
        config = TuneConfig(data=CHAT, training={"packing": packing})
        tokenizer = models.load_tokenizer(config)
        loaded[packing] = models.build(config, tokenizer=tokenizer).model.eval()
    assert loaded[True].config._attn_implementation == packed_attention.NAME
    prompts = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = {p: m.generate(**prompts, max_new_tokens=8, do_sample=False) for p, m in loaded.items()}
        logits = {p: m(**prompts).logits for p, m in loaded.items()}
    assert torch.equal(outputs[True], outputs[False])
    torch.testing.assert_close(logits[True], logits[False])


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


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_packed_batch_gives_the_gradients_of_the_padded_one(method):
    import torch

    from nbtune import data as data_module
    from nbtune import models

    config, tokenizer, data = prepared(method, rows=ALL)
    model = models.build(config, tokenizer=tokenizer).model.eval()  # no dropout: the two passes compare exactly
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero, which would leave A's gradient zero on both sides
            p.data.normal_(0, 0.05)
    examples = data.train[:12]
    padded_batch = data_module.Collator(tokenizer.pad_token_id, "causal-lm")(examples)
    padded_batch["labels"][:, 0] = -100
    grads = {}
    for side, batch in (("packed", data.packing(examples)), ("padded", padded_batch)):
        model.zero_grad()
        model(**batch).loss.backward()
        grads[side] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads["packed"].keys() == grads["padded"].keys() and grads["padded"]
    for name, grad in grads["padded"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["packed"][name], grad, rtol=1e-3, atol=1e-6, msg=name)


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
