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
from nbtune.methods.peft_methods import disable_cpu_inference_repacking
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
    return LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                          "pad_token_id": 0, "attention_bias": True, "mlp_bias": True, "num_labels": 3, **changes})


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models run fastest on one thread; several threads on a shared, busy CPU wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    load_kwargs = method.load_kwargs(params, ctx) if method.load_kwargs else {}
    model = method.apply(load_base(directory, task, load_kwargs), params, ctx)

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
    compute_loss = method.compute_loss
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
    if getattr(fresh, "is_loaded_in_4bit", False):
        # Same 4-bit kernel as in training: bitsandbytes' CPU inference layout computes in bf16 (~2e-3 apart).
        disable_cpu_inference_repacking(fresh)
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


# ----- the registry as forms, docs and validation read it ------------------------------------------------------
def test_registry_lists_the_built_in_methods_then_one_per_other_peft_method() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert registry.names(include_generated=False) == BUILT_IN
    names = registry.names()
    assert names[:len(BUILT_IN)] == BUILT_IN
    peft_names = {t.value.lower().replace("_", "-") for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    assert set(names) == set(BUILT_IN) | peft_names
    for method in registry.all_methods():
        assert method.title and method.description and method.paper and method.learning_rate > 0
        assert all(f.help and f.check(f.default) is None for f in method.fields), method.name
        if method.virtual_tokens:
            assert method.field(method.virtual_tokens).kind == "int"
    assert [registry.get(n).virtual_tokens for n in ("prompt-tuning", "p-tuning", "lora")] == [
        "num_virtual_tokens", "num_virtual_tokens", None]


def test_reading_the_built_in_registry_does_not_import_torch() -> None:
    code = ("import sys; from nbtune.methods import registry; "
            "assert registry.names(include_generated=False); registry.get('qlora').defaults(); "
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_method_registered_before_any_read_keeps_every_built_in_and_a_taken_name_is_refused() -> None:
    # A fresh process: the registry has not been read yet when the user registers.
    code = f"""
import pytest
from nbtune.methods import Method, registry
from nbtune.methods.selective import apply_full

def mine(name):
    return Method(name=name, title=name.upper(), family="full", description="mine", paper="-", fields=(),
                  apply=apply_full, learning_rate=1e-4, is_peft=False)

registry.register(mine("my-full"))
registry.register(mine("vera"))  # also a peft method: the user's entry wins, peft's is not generated
assert registry.names(include_generated=False) == {BUILT_IN!r} + ["my-full", "vera"]
for taken in ("lora", "my-full"):
    with pytest.raises(ValueError, match=f"method '{{taken}}' is already registered"):
        registry.register(mine(taken))
assert registry.get("lora").title == "LoRA" and registry.get("vera").title == "VERA"
assert len(registry.names()) > {len(BUILT_IN) + 2} and registry.names().count("vera") == 1
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validation_names_field_value_and_what_is_allowed() -> None:
    lora = registry.get("lora")
    assert lora.check({"r": 0}) == [("method.r", "method.r must be >= 1 (got 0)")]
    [(field, message)] = lora.check({"rank": 8})
    assert field == "method.rank" and "not a parameter of lora" in message and "alpha" in message
    assert "must be one of top-only, bottom-frozen (got 'middle')" in registry.get("freeze").check(
        {"mode": "middle"})[0][1]
    with pytest.raises(Exception, match=r"method.r must be >= 1 \(got 0\)"):
        TuneConfig(method={"name": "lora", "r": 0})


def test_bitfit_on_a_model_without_biases_says_so_and_suggests_lora_or_ia3() -> None:
    model = auto_class("causal-lm").from_config(model_config("causal-lm", attention_bias=False, mlp_bias=False))
    ctx = MethodContext(task="causal-lm")
    with pytest.raises(ValueError, match="bitfit needs bias parameters, but LlamaForCausalLM has none.*lora or ia3"):
        registry.get("bitfit").apply(model, {}, ctx)


def test_freeze_with_more_layers_than_the_model_has_names_the_limit() -> None:
    model = auto_class("causal-lm").from_config(model_config("causal-lm"))
    params = registry.get("freeze").resolve({"layers": 5})
    with pytest.raises(ValueError, match=r"method.layers must be between 0 and 2, the layer count of "
                                         r"LlamaForCausalLM \(got 5\)"):
        registry.get("freeze").apply(model, params, MethodContext(task="causal-lm"))


def test_freeze_top_only_trains_the_top_layer_and_head_only() -> None:
    model = auto_class("causal-lm").from_config(model_config("causal-lm"))
    registry.get("freeze").apply(model, registry.get("freeze").resolve({}), MethodContext(task="causal-lm"))
    trained = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"layers", "norm", "lm_head"}
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())


# ----- method details ------------------------------------------------------------------------------------------
def test_adalora_reallocates_its_budget_with_live_gradients_inside_the_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    method = registry.get("adalora")
    params = method.resolve({"tinit": 0, "tfinal": 1, "deltaT": 1})
    ctx = MethodContext(task="causal-lm", extras={"total_steps": 3})
    model = method.apply(auto_class("causal-lm").from_config(model_config("causal-lm")), params, ctx)
    seen = []
    allocate = model.base_model.update_and_allocate

    def spy(global_step: int) -> None:
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        seen.append((global_step, all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)))
        allocate(global_step)

    model.base_model.update_and_allocate = spy
    rows = [{k: v[0] for k, v in batch("causal-lm").items()}] * 6
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows,
            callbacks=method.callbacks(model, params, ctx)).train()
    assert seen == [(0, True), (1, True), (2, True)]


def test_prompt_tuning_text_init_starts_from_the_embeddings_of_the_text() -> None:
    def tokenizer(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [10 + len(word) for word in text.split()]}

    method = registry.get("prompt-tuning")
    params = method.resolve({"num_virtual_tokens": 5, "init": "text", "init_text": "ab abc"})
    base = auto_class("causal-lm").from_config(model_config("causal-lm"))
    model = method.apply(base, params, MethodContext(task="causal-lm", tokenizer=tokenizer))
    prompt = model.prompt_encoder["default"].embedding.weight
    words = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt, words[[12, 13, 12, 13, 12]])


def test_distillation_student_starts_from_every_other_teacher_layer_and_matches_the_loss() -> None:
    teacher = auto_class("causal-lm").from_config(model_config("causal-lm", num_hidden_layers=4))
    method = registry.get("distillation")
    ctx = MethodContext(task="causal-lm")
    student = method.apply(teacher, method.resolve({"alpha": 0.25}), ctx)
    assert ctx.extras["teacher"] is teacher and not teacher.training
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for j, i in enumerate((0, 2)):
        for (_, s), (_, t) in zip(student.model.layers[j].state_dict().items(),
                                  teacher.model.layers[i].state_dict().items(), strict=True):
            assert torch.equal(s, t)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)

    # a student identical to its teacher has nothing left to distil: only the hard-label term remains
    twin = method.apply(teacher, method.resolve({"alpha": 0.25, "student_layers": 4}), ctx)
    loss, outputs = method.compute_loss(twin.eval(), batch("causal-lm"), ctx)
    torch.testing.assert_close(loss, 0.75 * outputs.loss)


def test_counting_a_7b_llama_is_exact_and_fast() -> None:
    import time

    from transformers import LlamaConfig

    llama_7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32)
    counts = {}
    for name in ("full", "lora", "qlora"):
        start = time.perf_counter()
        counts[name] = trainable_parameters(TuneConfig(model={"name_or_path": "llama-7b"}, method=name), llama_7b)
        assert time.perf_counter() - start < 2.0
    assert counts["full"] == (6_738_415_616, 6_738_415_616)
    lora = 32 * 2 * 2 * 4096 * 16  # q_proj and v_proj of 32 layers, A and B of rank 16
    assert counts["lora"] == counts["qlora"] == (lora, 6_738_415_616 + lora)


def test_qlora_keeps_training_after_an_evaluation_on_cpu(base_dirs: dict[str, Path]) -> None:
    method = registry.get("qlora")
    params, ctx = method.resolve({}), MethodContext(task="causal-lm")
    base = load_base(base_dirs["causal-lm"], "causal-lm", method.load_kwargs(params, ctx))
    assert base.is_loaded_in_4bit
    model = method.apply(base, params, ctx)
    inputs = batch("causal-lm")
    for training in (True, False, True):  # the engine evaluates between training steps
        model.train(training)
        with torch.set_grad_enabled(training):
            loss = model(**inputs).loss
        if training:
            loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["prefix-tuning", "p-tuning-v2"])
def test_prefix_methods_refuse_gradient_checkpointing_and_are_never_offered_it(method):
    from nbtune.config import ConfigError
    from nbtune.estimator import estimate_memory

    with pytest.raises(ConfigError) as err:
        TuneConfig(method=method, training={"gradient_checkpointing": True})
    assert "KV cache" in err.value.for_field("training.gradient_checkpointing")
    big = TuneConfig(model={"name_or_path": "meta-llama/Llama-3.1-8B"}, method=method,
                     data={"max_length": 4096}, training={"micro_batch_size": 8})
    offered = [s.changes for s in estimate_memory(big, gpu="t4").suggestions]
    assert offered and not any(c.get("training.gradient_checkpointing") for c in offered)


def test_qlora_stores_its_packed_weights_in_the_compute_dtype_only_when_sharded():
    # FSDP and ZeRO-3 flatten a shard's parameters into one tensor of one dtype, so the 4-bit storage must
    # match the bf16 weights beside it; unsharded, bitsandbytes' own uint8 storage stays
    import torch

    from nbtune.methods import registry
    from nbtune.methods.registry import MethodContext

    qlora = registry.get("qlora")
    params = qlora.resolve({})
    for sharded, storage in ((True, torch.bfloat16), (False, torch.uint8)):
        kwargs = qlora.load_kwargs(params, MethodContext(task="causal-lm", dtype="bf16", sharded=sharded))
        assert kwargs["quantization_config"].bnb_4bit_quant_storage == storage
