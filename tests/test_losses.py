"""training.loss_implementation: the chunked loss trains exactly as the standard one, without the full logits;
liger falls back to it where liger-kernel cannot run; the config refuses both where they cannot apply."""

from __future__ import annotations

import sys
import types

import pytest

import nbtune
from nbtune import TuneConfig, losses
from nbtune.config import ConfigError

CHAT = {"source": "nbtune:chat", "max_samples": 24}  # answers only are trained: padding and ignored prompts


def prepared(method: str, **training):
    from nbtune import data, models

    config = TuneConfig(method=method, data=CHAT, training=training)
    tokenizer = models.load_tokenizer(config)
    return config, tokenizer, data.prepare(config, tokenizer)


def loss_and_gradients(model, batch, chunked: bool, **kwargs):
    import torch

    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks (LoRA's) for both
    loss = losses.chunked_loss(model, batch, **kwargs)[0] if chunked else model(**batch, **kwargs).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(model, batch, **kwargs):
    import torch

    standard, expected = loss_and_gradients(model, batch, chunked=False, **kwargs)
    chunked, got = loss_and_gradients(model, batch, chunked=True, **kwargs)
    assert chunked == pytest.approx(standard, rel=1e-6)
    assert got.keys() == expected.keys() and expected
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["lora", "full", "prompt-tuning", "prefix-tuning"])
def test_the_chunked_loss_and_its_gradients_are_the_standard_ones_on_a_padded_batch(method):
    from nbtune import data as data_module
    from nbtune import models

    config, tokenizer, data = prepared(method)
    model = models.build(config, tokenizer=tokenizer).model.train()
    batch = data_module.Collator(tokenizer.pad_token_id, "causal-lm")(data.train[:8])
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()  # padding, prompts ignored
    assert_same_training(model, batch)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_chunked_loss_is_the_standard_one_on_a_packed_batch_and_over_an_accumulated_batch(method):
    import torch

    from nbtune import models

    config, tokenizer, data = prepared(method, packing=True)
    model = models.build(config, tokenizer=tokenizer).model.train()
    batch = data.packing(data.train[:8])
    assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]
    assert_same_training(model, batch)
    # with gradient accumulation the Trainer divides by the trained tokens of the whole accumulated batch
    assert_same_training(model, batch, num_items_in_batch=torch.tensor(500))


@pytest.mark.parametrize(("family", "extra"), [("gemma2", {"final_logit_softcapping": 3.0}),
                                               ("cohere", {"logit_scale": 0.5}), ("granite", {"logits_scaling": 4.0}),
                                               ("qwen2", {})])
def test_the_chunked_loss_applies_what_a_model_does_to_its_logits(family, extra):
    """Soft-capping (Gemma 2), a logit scale (Cohere) or divisor (Granite) happen after the LM head."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               vocab_size=512, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 512, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    assert_same_training(model, {"input_ids": ids, "labels": labels})


def test_the_full_logits_never_exist_in_a_chunked_step():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from nbtune import data as data_module
    from nbtune import models

    class LargestLogits(TorchDispatchMode):
        """The most elements any tensor of logits (tokens..., vocab) had: ending in the vocabulary dimension, and
        not the LM head's weight (hidden, vocab) as the CPU matmul lays it out."""

        def __init__(self, vocab: int, hidden: int):
            super().__init__()
            self.vocab, self.hidden, self.largest = vocab, hidden, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == self.vocab and \
                        tuple(x.shape) != (self.hidden, self.vocab):
                    self.largest = max(self.largest, x.numel())
            return out

    config, tokenizer, data = prepared("lora")
    model = models.build(config, tokenizer=tokenizer).model.train()
    batch = data_module.Collator(tokenizer.pad_token_id, "causal-lm")(data.train[:16])
    vocab, tokens, hidden = model.config.vocab_size, batch["input_ids"].numel(), model.config.hidden_size
    largest = {}
    for chunked in (False, True):
        with LargestLogits(vocab, hidden) as probe:
            loss_and_gradients(model, batch, chunked)
        largest[chunked] = probe.largest
    assert largest[False] == tokens * vocab  # the probe sees the standard loss's logits
    chunk = losses.chunk_tokens(tokens, vocab, hidden)
    assert 0 < largest[True] <= chunk * vocab < tokens * vocab / 8


@pytest.mark.parametrize(("packing", "dtype"), [(False, "fp32"), (True, "fp32"), (False, "bf16")])
def test_a_chunked_run_trains_and_evaluates_as_a_standard_one(store, packing, dtype, monkeypatch):
    """Also with 16-bit weights under the Trainer's autocast, which covers the model's forward only (accelerate)
    and hands its outputs over in fp32: the head must run under the same autocast."""
    calls = []
    real = losses.chunked_loss
    monkeypatch.setattr(losses, "chunked_loss", lambda *args: calls.append(args[0].training) or real(*args))
    runs = {}
    for implementation in ("standard", "chunked"):
        config = TuneConfig(model={"dtype": dtype}, data={**CHAT, "max_samples": 48}, training={
            "max_steps": 3, "micro_batch_size": 8, "gradient_accumulation_steps": 2, "eval_every": None,
            "log_every": 1, "packing": packing, "loss_implementation": implementation, "precision": dtype})
        runs[implementation] = run = nbtune.train(config, store=store, progress=False)
        assert run.summary.state == "finished", run.summary.error
    assert set(calls) == {True, False}  # the chunked run's training steps and its evaluation
    standard, chunked = runs["standard"].summary, runs["chunked"].summary
    # bf16 weights: an update rounds to bf16, so the last gradients' last bits move the weights the eval reads
    # (measured 1e-4 relative on a CPU with native bf16, an Intel Xeon; equal to 1e-5 where bf16 is emulated)
    tolerance = 1e-5 if dtype == "fp32" else 1e-3
    assert chunked.final_train_loss == pytest.approx(standard.final_train_loss, rel=tolerance)
    assert chunked.final_eval_loss == pytest.approx(standard.final_eval_loss, rel=tolerance)
    assert runs["chunked"].config.content_hash != runs["standard"].config.content_hash


def test_liger_asked_on_this_cpu_trains_chunked_and_says_why(store):
    config = TuneConfig(data=CHAT, training={"max_steps": 2, "micro_batch_size": 4, "eval_every": None,
                                             "log_every": 1, "loss_implementation": "liger"})
    run = nbtune.train(config, store=store, progress=False)
    assert run.summary.state == "finished", run.summary.error
    (started,) = [e.data for e in run.events.history if e.kind == "started"]
    assert started["loss_implementation"] == "chunked"
    said = [e.data["text"] for e in run.events.history if e.kind == "message" and e.data.get("source") == "nbtune"]
    assert any("training.loss_implementation liger" in text and "chunked" in text for text in said), said
    assert "liger" in run.summary.note and "chunked" in run.summary.note


@pytest.fixture
def liger_installed(monkeypatch):
    """A stand-in liger-kernel that has kernels for Llama only (the real one needs triton and CUDA)."""
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": lambda **kw: None}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    real = losses.importlib.util.find_spec
    monkeypatch.setattr(losses.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real(name, *a))


def test_liger_is_chosen_only_on_cuda_and_for_a_family_it_has_kernels_for(liger_installed):
    import transformers

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    assert losses.choose("liger", llama, on_gpu=True) == losses.Choice("liger")
    on_cpu = losses.choose("liger", llama, on_gpu=False)
    assert on_cpu.value == "chunked" and "CUDA" in on_cpu.reason
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    other = losses.choose("liger", qwen, on_gpu=True)
    assert other.value == "chunked" and "no kernels for model type qwen2" in other.reason
    assert losses.choose("chunked", llama, on_gpu=True) == losses.Choice("chunked")


def test_liger_chosen_turns_on_the_trainers_liger_kernels_and_nothing_else_does():
    from types import SimpleNamespace

    from nbtune import training

    config = TuneConfig(training={"loss_implementation": "liger"})

    def arguments(choice):
        stage = SimpleNamespace(arguments=lambda config, common: common)
        prepared = SimpleNamespace(data=SimpleNamespace(eval=[]), precision=SimpleNamespace(value="fp32"),
                                   on_gpu=False, stage=stage, loss=choice)
        return training._training_arguments(config, prepared, training.Path("/tmp/nowhere"))

    assert arguments(losses.Choice("liger"))["use_liger_kernel"] is True
    assert "use_liger_kernel" not in arguments(losses.Choice("chunked", "a fallback"))


@pytest.mark.parametrize("implementation", ["chunked", "liger"])
def test_the_config_refuses_a_chunked_or_fused_loss_where_it_cannot_apply(implementation):
    field = "training.loss_implementation"
    cases = [(dict(model={"task": "seq-cls"}, data={"source": "nbtune:regions"}), "model.task causal-lm"),
             (dict(model={"task": "seq2seq"}, data={"source": "nbtune:capitals"}), "model.task causal-lm"),
             (dict(method="distillation"), "method distillation")]
    for sections, words in cases:
        with pytest.raises(ConfigError) as err:
            TuneConfig(**sections, training={"loss_implementation": implementation})
        message = err.value.for_field(field)
        assert message and field in message and implementation in message and words in message, message
        assert "set training.loss_implementation to standard" in message
    with pytest.raises(ConfigError) as err:
        TuneConfig(training={"loss_implementation": "fused"})
    assert err.value.for_field(field) == f"{field} must be one of standard, chunked, liger (got 'fused')"


def test_only_sft_reads_the_loss_implementation_and_standard_keeps_the_cache_key():
    sft = TuneConfig()
    assert sft.replace(**{"training.loss_implementation": "standard"}).content_hash == sft.content_hash
    assert sft.replace(**{"training.loss_implementation": "chunked"}).content_hash != sft.content_hash
    dpo = TuneConfig(data={"source": "nbtune:prefs"}, training={"stage": "dpo"})
    chunked_dpo = dpo.replace(**{"training.loss_implementation": "chunked"})  # TRL's fused head scores it
    assert chunked_dpo.content_hash == dpo.content_hash and losses.requested(chunked_dpo) == "standard"


def test_chunks_hold_about_as_many_logits_as_the_hidden_states():
    # Llama 3.1 8B: vocabulary 128256, hidden 4096 -> 32 chunks; Liger rounds a chunk up to a power of two
    assert losses.chunk_tokens(8192, 128256, 4096) == 256
    assert losses.chunk_tokens(8000, 128256, 4096) == 250
    assert losses.chunk_tokens(8000, 128256, 4096, "liger") == 256
    assert losses.chunk_tokens(100, 256, 512, "liger") == 100  # one chunk: never more than the tokens
