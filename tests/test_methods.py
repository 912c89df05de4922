"""Every tuning method in the registry trains what it says, counts what it trains, and saves what it trained.

Tiny models built from config objects: a Llama-style causal LM with biases, its sequence-classification
variant, and a T5 for seq2seq.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nbtune.config import TuneConfig
from nbtune.methods import artifacts, registry
from nbtune.methods.counting import count_parameters, trainable_parameters
from nbtune.methods.registry import MethodContext
from nbtune.models import auto_class

BUILT_IN = ["full", "freeze", "bitfit", "lora", "qlora", "adapter", "prompt-tuning", "prefix-tuning", "p-tuning",
            "p-tuning-v2", "ia3", "adalora", "distillation"]
VOCAB = 128
# Generated peft methods whose defaults do not fit a 64-wide model: sizes that do.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "adaption-prompt": {"adapter_len": 4, "adapter_layers": 1},
    "c3a": {"block_size": 16},
    "road": {"group_size": 16},
    "shira": {"r": 8},
    "trainable-tokens": {"token_indices": [51, 61]},  # tokens of the test batch, so they get gradients
    "vblora": {"vector_length": 16, "num_vectors": 32},
    "waveft": {"n_frequency": 100},
}
# Generated peft methods that cannot apply to the tiny Llama as nbtune trains it, with the exact error they raise.
CANNOT_APPLY: dict[str, tuple[type[Exception], str]] = {
    "cpt": (AssertionError, "loss is nan: peft's CPT loss needs its own `input_type_mask` batches, "
                            "nbtune's batches carry plain labels"),
    "multitask-prompt-tuning": (ValueError, "ValueError: task_ids cannot be None (nbtune's batches carry no task ids)"),
    "poly": (ValueError, "ValueError: task_ids should not be None. (nbtune's batches carry no task ids)"),
    "shadow": (AssertionError, "trainable base_model.model.model.layers.1.shadow_update_transform.default.0.weight "
                               "did not change: peft's Shadow builds an update transform for the last layer too, "
                               "which feeds no later layer, so it never gets a gradient"),
    "xlora": (ValueError, "ValueError: `use_cache` must be False (X-LoRA mixes already trained LoRA adapters, "
                          "given by its dict-typed `adapters` field)"),
}
# Generated peft methods that need an optional library this environment may lack.
NEEDS_LIBRARY = {"adamss": "sklearn"}


def model_config(task: str, **changes: Any) -> Any:
    from transformers import LlamaConfig, T5Config

    if task == "seq2seq":
        return T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **changes)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                       **{"attention_bias": True, "mlp_bias": True, "num_labels": 3, **changes})


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded tiny base models saved as the engine would find them on disk, one per task."""
    dirs = {}
    for task in ("causal-lm", "seq-cls", "seq2seq"):
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(task)
        model = auto_class(task).from_config(model_config(task))
        with torch.no_grad():  # like a pretrained model's, not the zeros of a fresh init
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.02)
        model.save_pretrained(directory)
        dirs[task] = directory
    return dirs


def load_base(directory: Path, task: str, extra: dict[str, Any] | None = None) -> Any:
    return auto_class(task).from_pretrained(str(directory), **(extra or {}))


def batch(task: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    if task == "causal-lm":
        labels = ids.clone()
        labels[:, :3] = -100  # the prompt part is not trained on
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if task == "seq-cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, VOCAB, (2, 5), generator=g)}


def check_method(name: str, task: str, directory: Path, tmp_path: Path, params: dict[str, Any] | None = None) -> None:
    """(a) counts agree, (b) one training step changes exactly the trainable weights, (c) the artifact reloads."""
    method = registry.get(name)
    params = method.resolve(params or {})
    ctx = MethodContext(task=task, model_config=model_config(task), num_labels=3, dtype="fp32",
                        extras={"total_steps": 100})
    load_kwargs = method.hook("load_kwargs")(params, ctx) if method.load_kwargs else {}
    model = method.hook("apply")(load_base(directory, task, load_kwargs), params, ctx)

    # (a) the reported trainable count is the independent one, and the meta-skeleton count agrees
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    config = TuneConfig(model={"name_or_path": str(directory), "task": task}, method={"name": name, **params},
                        training={"max_steps": 100})
    assert trainable_parameters(config, model_config(task)) == (trainable, total)

    # (b) real optimizer steps: frozen weights bit-identical, every trainable weight moved.
    # Two steps, because zero-initialised halves (LoRA's B, an adapter's up-projection) give their partner
    # no gradient on the first one.
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = ctx.extras.get("teacher")
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()} if teacher else {}
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.0)
    compute_loss = method.hook("compute_loss")
    for _ in range(2):
        inputs = batch(task)
        loss = compute_loss(model, inputs, ctx)[0] if compute_loss else model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(before[n], p.detach()), f"trainable {n} did not change"
        else:
            assert torch.equal(before[n], p.detach()), f"frozen {n} changed"
    for n, p in (teacher.named_parameters() if teacher else []):
        assert torch.equal(teacher_before[n], p.detach()), f"teacher {n} changed"

    # (c) save, reload onto a fresh base, same logits
    model.eval()
    inputs = {k: v for k, v in batch(task).items() if task == "seq2seq" or k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    artifacts.save_trained(model, method, tmp_path / "artifact", ctx)
    fresh = load_base(directory, task, load_kwargs)
    if method.is_peft:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "artifact")).eval()
    else:
        reloaded = artifacts.load_trained(method, fresh, tmp_path / "artifact", ctx)
    with torch.no_grad():
        actual = reloaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_method_on_causal_lm(name: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    check_method(name, "causal-lm", base_dirs["causal-lm"], tmp_path)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_method_on_sequence_classification(name: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    check_method(name, "seq-cls", base_dirs["seq-cls"], tmp_path)


SEQ2SEQ = ["full", "freeze", "lora", "adapter", "prompt-tuning", "prefix-tuning", "ia3"]


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_method_on_seq2seq(name: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    check_method(name, "seq2seq", base_dirs["seq2seq"], tmp_path)


def generated_cases() -> list[Any]:
    cases = []
    for method in registry.all_methods():
        if not method.generated:
            continue
        marks = []
        if method.name in CANNOT_APPLY:
            error, reason = CANNOT_APPLY[method.name]
            marks.append(pytest.mark.xfail(raises=error, reason=reason, strict=True))
        if method.name in NEEDS_LIBRARY:
            library = NEEDS_LIBRARY[method.name]
            marks.append(pytest.mark.skipif(importlib.util.find_spec(library) is None,
                                            reason=f"{method.name} needs {library}, which is not installed"))
        cases.append(pytest.param(method.name, marks=marks))
    return cases


@pytest.mark.parametrize("name", generated_cases())
def test_generated_peft_method(name: str, base_dirs: dict[str, Path], tmp_path: Path) -> None:
    method = registry.get(name)
    assert method.generated and method.is_peft and method.fields
    check_method(name, "causal-lm", base_dirs["causal-lm"], tmp_path, TINY_PARAMS.get(name))
